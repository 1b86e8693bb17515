//! Each of ResNet50's conv shapes (batch 1, 224x224) timed alone through
//! the conv the network runs (packed kernel, fused bias and ReLU), with its
//! GFLOP/s and its share of a forward pass: where the time goes, shape by
//! shape, when the kernel is tuned. Not a test; the figures depend on the
//! machine.
//!
//!     THREADS=2 cargo run --release -p resnet-core --example conv-speed

use resnet_core::ops::{Conv2d, ConvGeometry};
use resnet_core::Tensor;
use std::time::Instant;

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(std::env::var("THREADS").map_or(1, |t| t.parse().unwrap()))
        .build_global()
        .unwrap();
    // (in, out, kernel, stride, padding, input size, how many in ResNet50)
    let shapes = [
        (3, 64, 7, 2, 3, 224, 1),
        (64, 64, 1, 1, 0, 56, 1),
        (64, 64, 3, 1, 1, 56, 3),
        (64, 256, 1, 1, 0, 56, 4),
        (256, 64, 1, 1, 0, 56, 2),
        (256, 128, 1, 1, 0, 56, 1),
        (128, 128, 3, 2, 1, 56, 1),
        (128, 512, 1, 1, 0, 28, 4),
        (256, 512, 1, 2, 0, 56, 1),
        (512, 128, 1, 1, 0, 28, 3),
        (128, 128, 3, 1, 1, 28, 3),
        (512, 256, 1, 1, 0, 28, 1),
        (256, 256, 3, 2, 1, 28, 1),
        (256, 1024, 1, 1, 0, 14, 6),
        (512, 1024, 1, 2, 0, 28, 1),
        (1024, 256, 1, 1, 0, 14, 5),
        (256, 256, 3, 1, 1, 14, 5),
        (1024, 512, 1, 1, 0, 14, 1),
        (512, 512, 3, 2, 1, 14, 1),
        (512, 2048, 1, 1, 0, 7, 3),
        (1024, 2048, 1, 2, 0, 14, 1),
        (2048, 512, 1, 1, 0, 7, 2),
        (512, 512, 3, 1, 1, 7, 2),
    ];
    let mut total = 0.0;
    for (cin, cout, k, s, p, size, count) in shapes {
        let g = ConvGeometry::square(k, s, p, 1);
        let w = vec![0.01f32; cout * cin * k * k];
        let conv = Conv2d::new(cin, cout, g, w, Some(vec![0.0; cout]));
        let x = Tensor::from_nhwc(ndarray::Array4::from_elem((1, size, size, cin), 0.5));
        let out = conv.forward_fused(&x, None, true).unwrap();
        let [_, oh, ow, _] = out.nhwc_shape();
        let flops = 2.0 * (oh * ow * cout * cin * k * k) as f64;
        let reps = 20;
        let start = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(conv.forward_fused(&x, None, true).unwrap());
        }
        let t = start.elapsed().as_secs_f64() / reps as f64;
        total += t * count as f64;
        println!("{cin:>5}->{cout:<5} k{k} s{s} @{size:<3} x{count}: {:6.2} ms  {:5.1} GF/s  (total {:6.2} ms)", t * 1e3, flops / t / 1e9, t * 1e3 * count as f64);
    }
    println!("sum of convs: {:.1} ms", total * 1e3);
}
