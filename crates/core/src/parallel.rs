//! The inference path's threads: a pool whose workers spin between parallel
//! regions instead of sleeping, as OpenMP's and ONNX Runtime's do.
//!
//! Why not rayon here, as everywhere else? A rayon worker with nothing to
//! do sleeps within microseconds, and a forward pass is some sixty short
//! parallel regions with a little serial work between them (a padded copy,
//! the pooling). Measured on a 2-vCPU virtual machine: after the process
//! had been idle for 0.3 s, rayon's second worker came back so slowly that
//! each region ran on one core for the next 30-40 ms (a two-thread ResNet50
//! pass took 47 ms, against 27 ms when passes ran back to back). A halted
//! virtual CPU takes the host a long time to wake; one that spins does not
//! halt. So each worker spins for [`SPIN`] after its last region before it
//! parks: all through a pass, and for a moment after it.
//!
//! The caller works on its own region too, and indices are claimed one at
//! a time, so a worker that joins late (still waking) costs nothing but its
//! share. One region runs at a time per pool; a caller that finds the pool
//! busy (another thread's pass, or a region started from inside a region)
//! runs its region alone, which gives the same results.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long a worker spins, waiting for the next region, before it parks.
const SPIN: Duration = Duration::from_millis(2);
/// How long of that it keeps its CPU to itself; after, it yields the CPU at
/// each check, to whatever else the process runs between regions (`verify`
/// compares each stage on rayon's threads), and stays awake all the same.
const SPIN_ALONE: Duration = Duration::from_micros(50);

/// Runs `task(index)` for every index in `0..count`, over `threads` threads
/// (the caller's and `threads - 1` workers), and returns once all have run.
/// Which thread runs an index is not fixed, so a task's result must not
/// depend on it.
pub(crate) fn run(threads: usize, count: usize, task: &(dyn Fn(usize) + Sync)) {
    if threads <= 1 || count <= 1 {
        (0..count).for_each(task);
        return;
    }
    Pool::with_threads(threads).run(count, task);
}

/// Threads the core uses: as many as the rayon pool the caller runs in has
/// (`verify --threads`, `RAYON_NUM_THREADS`, or one per CPU), so that one
/// setting governs the core and the harness. On one of the core's own
/// workers that is the global pool's count; no task starts a region of
/// its own, and one that did would run it alone (see [`run`]'s pool).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `task(index, chunk)` on each `chunk_len`-long chunk of `data` (the
/// last may be shorter), as [`run`] does.
pub(crate) fn for_each_chunk<T: Send>(
    threads: usize,
    data: &mut [T],
    chunk_len: usize,
    task: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk_len = chunk_len.max(1);
    let (start, len) = (SendPointer(data.as_mut_ptr()), data.len());
    run(threads, len.div_ceil(chunk_len), &|index| {
        let first = index * chunk_len;
        let start = &start;
        // SAFETY: the chunks are disjoint and inside `data`, which this
        // function borrows mutably until every task has returned.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(start.0.add(first), chunk_len.min(len - first))
        };
        task(index, chunk);
    });
}

struct SendPointer<T>(*mut T);
// SAFETY: shared only to hand out disjoint chunks (see `for_each_chunk`).
unsafe impl<T: Send> Sync for SendPointer<T> {}

/// One parallel region, on the caller's stack while it runs.
struct Region {
    /// The task, its lifetime erased: `Pool::run` does not return while a
    /// worker can still reach it.
    task: *const (dyn Fn(usize) + Sync + 'static),
    count: usize,
    next: AtomicUsize,
}

impl Region {
    /// Claims and runs indices until none are left.
    fn work(&self) {
        // SAFETY: see `task`.
        let task = unsafe { &*self.task };
        loop {
            let index = self.next.fetch_add(1, SeqCst);
            if index >= self.count {
                return;
            }
            task(index);
        }
    }
}

struct Pool {
    /// The region running now, or null.
    region: AtomicPtr<Region>,
    /// Counts the regions started: a worker waits for it to change.
    generation: AtomicU64,
    /// Workers between joining a region and leaving it.
    inside: AtomicUsize,
    /// What the first task to panic on a worker panicked with, for the
    /// caller to panic with in turn.
    panicked: Mutex<Option<Box<dyn Any + Send>>>,
    /// Held by the caller whose region runs.
    running: Mutex<()>,
    /// Parked workers, and the condition that wakes them.
    parked: Mutex<usize>,
    wake: Condvar,
}

impl Pool {
    /// The pool of `threads` threads, made (and its workers started) the
    /// first time it is asked for; it lives as long as the process.
    fn with_threads(threads: usize) -> &'static Pool {
        static POOLS: OnceLock<Mutex<Vec<(usize, &'static Pool)>>> = OnceLock::new();
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&(_, pool)) = pools.iter().find(|(size, _)| *size == threads) {
            return pool;
        }
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            region: AtomicPtr::new(std::ptr::null_mut()),
            generation: AtomicU64::new(0),
            inside: AtomicUsize::new(0),
            panicked: Mutex::new(None),
            running: Mutex::new(()),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        }));
        for worker in 1..threads {
            std::thread::Builder::new()
                .name(format!("resnet-core-{worker}"))
                .spawn(move || pool.serve())
                .expect("cannot start a worker thread");
        }
        pools.push((threads, pool));
        pool
    }

    fn run(&self, count: usize, task: &(dyn Fn(usize) + Sync)) {
        // A task that panicked on the caller poisons the lock; the pool
        // itself is whole again once `Closing` has run.
        let _running = match self.running.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..count).for_each(task);
                return;
            }
        };
        // SAFETY: only the lifetime changes; `Closing` below keeps this
        // function from returning (or unwinding) while a worker can reach
        // the region.
        let task: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(task) };
        let region = Region {
            task,
            count,
            next: AtomicUsize::new(0),
        };
        // A panic left over from a region whose caller panicked too.
        self.take_panic();
        let closing = Closing {
            pool: self,
            region: &region,
        };
        self.region
            .store(&region as *const Region as *mut Region, SeqCst);
        self.generation.fetch_add(1, SeqCst);
        if *self.parked.lock().unwrap_or_else(|p| p.into_inner()) > 0 {
            self.wake.notify_all();
        }
        region.work();
        drop(closing);
        if let Some(payload) = self.take_panic() {
            std::panic::resume_unwind(payload);
        }
    }

    fn take_panic(&self) -> Option<Box<dyn Any + Send>> {
        self.panicked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// A worker's life: wait for a region, help with it, again.
    fn serve(&self) {
        let mut seen = self.generation.load(SeqCst);
        loop {
            seen = self.next_generation(seen);
            // Counted inside before the region is read, so the caller that
            // closes it (region cleared, then `inside` read) either waits
            // for this worker or is seen to have closed it.
            self.inside.fetch_add(1, SeqCst);
            let region = self.region.load(SeqCst);
            if !region.is_null() {
                // SAFETY: the region's caller waits for `inside` to fall.
                let region = unsafe { &*region };
                if let Err(payload) = catch_unwind(AssertUnwindSafe(|| region.work())) {
                    // The rest need not run: the caller panics.
                    region.next.store(region.count, SeqCst);
                    self.panicked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(payload);
                }
            }
            self.inside.fetch_sub(1, SeqCst);
        }
    }

    /// Waits until a region after `seen` has started: spins for [`SPIN`],
    /// then parks.
    fn next_generation(&self, seen: u64) -> u64 {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let generation = self.generation.load(SeqCst);
            if generation != seen {
                return generation;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                let waited = started.elapsed();
                if waited > SPIN {
                    break;
                }
                if waited > SPIN_ALONE {
                    std::thread::yield_now();
                }
            }
        }
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        *parked += 1;
        // The count is raised before the generation is read again, and the
        // caller raises the generation before it reads the count: one of
        // the two sees the other, so no wake-up is lost.
        loop {
            let generation = self.generation.load(SeqCst);
            if generation != seen {
                *parked -= 1;
                return generation;
            }
            parked = self.wake.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Closes a region when dropped (on return or unwinding): no worker may
/// join it after, and every worker inside has left.
struct Closing<'a> {
    pool: &'a Pool,
    region: &'a Region,
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A task panicked on the caller: the rest need not run.
            self.region.next.store(self.region.count, SeqCst);
        }
        self.pool.region.store(std::ptr::null_mut(), SeqCst);
        let mut spins = 0u32;
        while self.pool.inside.load(SeqCst) != 0 {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            // A worker may have been preempted inside.
            if spins.is_multiple_of(256) {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_at_every_thread_count() {
        for threads in [1, 2, 3, 8] {
            for count in [0, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
                run(threads, count, &|index| {
                    hits[index].fetch_add(1, SeqCst);
                });
                assert!(
                    hits.iter().all(|hit| hit.load(SeqCst) == 1),
                    "{threads} threads, {count} indices"
                );
            }
        }
    }

    #[test]
    fn chunks_cover_the_data_once_with_a_short_last_chunk() {
        let mut data = vec![0usize; 103];
        for_each_chunk(3, &mut data, 10, |index, chunk| {
            assert!(chunk.len() == 10 || (index == 10 && chunk.len() == 3));
            chunk.iter_mut().for_each(|value| *value += index + 1);
        });
        let expected: Vec<usize> = (0..103).map(|i| i / 10 + 1).collect();
        assert_eq!(data, expected);
    }

    #[test]
    fn regions_from_many_callers_and_from_inside_a_region_all_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        run(2, 10, &|_| {
                            run(2, 3, &|_| {
                                total.fetch_add(1, SeqCst);
                            })
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(SeqCst), 4 * 50 * 10 * 3);
    }

    #[test]
    fn a_region_after_the_workers_parked_still_runs_on_them() {
        // A thread count no other test uses: a pool busy with another
        // test's region would run this one on the caller alone.
        const THREADS: usize = 5;
        run(THREADS, 4, &|_| {});
        std::thread::sleep(SPIN * 3);
        let on_workers = AtomicUsize::new(0);
        // Long enough tasks that the woken worker takes some.
        run(THREADS, 64, &|_| {
            if std::thread::current()
                .name()
                .is_some_and(|name| name.starts_with("resnet-core-"))
            {
                on_workers.fetch_add(1, SeqCst);
            }
            std::thread::sleep(Duration::from_millis(1));
        });
        assert!(on_workers.load(SeqCst) > 0);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_leaves_the_pool_usable() {
        const THREADS: usize = 6;
        for _ in 0..20 {
            // Tasks panic on the caller and on the worker alike.
            let result = std::panic::catch_unwind(|| {
                run(THREADS, 100, &|index| {
                    std::thread::sleep(Duration::from_micros(100));
                    assert!(index < 50, "index {index}");
                })
            });
            let payload = result.expect_err("the region panics");
            let message = payload.downcast_ref::<String>().expect("assert's message");
            assert!(message.starts_with("index "), "{message}");
            // Nothing is left over for the next region.
            let count = AtomicUsize::new(0);
            run(THREADS, 100, &|_| {
                count.fetch_add(1, SeqCst);
            });
            assert_eq!(count.load(SeqCst), 100);
        }
    }
}
