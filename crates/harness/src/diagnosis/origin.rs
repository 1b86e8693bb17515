//! Where an error was born. Run end to end, one wrong stage makes every
//! stage after it fail too; the first failure is the root, and what follows
//! is carried, unless its inputs pass end to end well within tolerance
//! (see the report's `CLEAN`): then the error is born
//! there too (a second mistake), and the stage introduces error. Fed the
//! reference's inputs (isolated), a stage fails only if it makes error
//! itself: it introduces error. With both modes, a stage that fails end to
//! end but not alone carries error from upstream.

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// The first stage that fails end to end.
    Root,
    /// Fails when fed the reference's inputs, or end to end where its
    /// inputs pass: this stage makes error.
    Introduces,
    /// Fails only because its inputs were already wrong.
    Carried {
        /// The root, or the nearest stage upstream that introduced error.
        from: String,
    },
}

/// The origin of a stage's failure, given the comparisons that failed,
/// whether the stage's inputs passed end to end (known in a cumulative run
/// only), and the stage that error would have been carried from (the root,
/// or the latest stage that introduced error). None for a stage that
/// passed. A container (block, layer, downsample) computes nothing of its
/// own: its output is its last child's, so its failure is carried from
/// inside it.
pub fn origin(
    cumulative_failed: bool,
    isolated_failed: bool,
    inputs_pass: bool,
    container: bool,
    upstream: Option<&str>,
) -> Option<Origin> {
    let born_here = isolated_failed || (cumulative_failed && inputs_pass && upstream.is_some());
    if born_here && !container {
        return Some(Origin::Introduces);
    }
    if !(cumulative_failed || isolated_failed) {
        return None;
    }
    Some(match upstream {
        Some(from) => Origin::Carried { from: from.into() },
        None => Origin::Root,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_the_root_and_later_ones_are_carried() {
        assert_eq!(origin(true, false, false, false, None), Some(Origin::Root));
        assert_eq!(
            origin(true, false, false, false, Some("conv1")),
            Some(Origin::Carried {
                from: "conv1".into()
            })
        );
        assert_eq!(
            origin(false, true, false, false, Some("bn1")),
            Some(Origin::Introduces)
        );
        assert_eq!(
            origin(true, true, false, false, None),
            Some(Origin::Introduces)
        );
        assert_eq!(origin(false, false, false, false, None), None);
        // A block fails because a stage inside it does.
        assert_eq!(
            origin(false, true, false, true, Some("layer1.0.bn3")),
            Some(Origin::Carried {
                from: "layer1.0.bn3".into()
            })
        );
        assert_eq!(
            origin(true, true, false, true, Some("layer1.0.bn3")),
            Some(Origin::Carried {
                from: "layer1.0.bn3".into()
            })
        );
        // A block that is the first failure end to end is the root.
        assert_eq!(origin(true, false, false, true, None), Some(Origin::Root));
        assert_eq!(origin(false, false, false, true, Some("conv1")), None);
        assert_eq!(origin(false, false, false, false, Some("conv1")), None);
        // After the root, a failure whose inputs pass end to end is a
        // mistake of its own; not a container's, nor the root itself.
        assert_eq!(
            origin(true, false, true, false, Some("maxpool")),
            Some(Origin::Introduces)
        );
        assert_eq!(
            origin(true, false, true, true, Some("layer2.0.bn1")),
            Some(Origin::Carried {
                from: "layer2.0.bn1".into()
            })
        );
        assert_eq!(origin(true, false, true, false, None), Some(Origin::Root));
    }
}
