//! A block's end, `relu(residual + identity)`, with the identity wrong: the
//! add left out, the ReLU before it, or the downsample path cut short. In
//! torchvision's ResNets a block has a downsample exactly where its
//! output's shape differs from its input's, so an engine cannot add the
//! block's input unchanged there;
//! what it can skip is the downsample's BatchNorm, or the identity as a
//! whole (which reads as a missing add).

use ndarray::ArrayD;
use resnet_core::StageKind;

use super::{relu, Evidence, Hint, Hypothesis, Observed, Side};

pub(super) fn hints(evidence: &Evidence, index: usize, observed: &Observed) -> Vec<Hint> {
    let Some(network) = evidence.network else {
        return Vec::new();
    };
    let stages = network.stages();
    let &[residual, identity] = network.stage_input_indices(index) else {
        return Vec::new();
    };
    let Some(branch) = evidence.reference_output(residual) else {
        return Vec::new();
    };
    let (branch_name, identity_name) = (&stages[residual].name, &stages[identity].name);

    // torch's block end, where the identity is stored: a mistake that
    // computes the same here (an identity of zeros) explains nothing.
    let skip = evidence
        .reference_output(identity)
        .filter(|skip| skip.shape() == branch.shape());
    let correct = skip.as_ref().map(|skip| relu(&(&*branch + &**skip)));
    let mut hints = Vec::new();
    let mut test = |hypothesis, recomputed: ArrayD<f32>, what: String| {
        if correct
            .as_ref()
            .is_some_and(|correct| !evidence.distinct(&recomputed, correct))
        {
            return;
        }
        if let Some((side, error)) = evidence.explains(&recomputed, observed) {
            hints.push(Hint {
                hypothesis,
                message: format!("{} {what}", side_verb(side)),
                relative_error: Some(error),
            });
        }
    };
    test(
        Hypothesis::MissingResidual,
        relu(&branch),
        format!("relu({branch_name}) without `+ {identity_name}`: the residual add is missing"),
    );
    if let Some(skip) = &skip {
        test(
            Hypothesis::ReluBeforeAdd,
            &relu(&branch) + &**skip,
            format!(
                "relu({branch_name}) + {identity_name}: the ReLU comes before the residual add, where torch adds first"
            ),
        );
    }
    let is_downsample = stages[identity].kind == StageKind::Sequential
        && stages[identity].module.ends_with(".downsample");
    if is_downsample {
        let conv_name = format!("{identity_name}.0");
        if let Some(conv_only) = evidence.reference_named(&conv_name) {
            if conv_only.shape() == branch.shape() {
                test(
                    Hypothesis::SkippedDownsample,
                    relu(&(&*branch + &*conv_only)),
                    format!(
                        "relu({branch_name} + {conv_name}): the downsample's BatchNorm ({identity_name}.1) was skipped"
                    ),
                );
            }
        }
    }
    hints
}

fn side_verb(side: Side) -> String {
    format!("{} equals", side.subject())
}
