//! Where weights come from, and the one place where torch's layouts are
//! turned into the core's.
//!
//! torch stores a conv weight OIHW (out, in, kernel height, kernel width) and
//! a linear weight `[out, in]`. The core multiplies NHWC activations by
//! weight matrices whose rows run over (kernel y, kernel x, input channel),
//! the order in which an NHWC patch lies in memory. Flattening OIHW and
//! reading it back in that order reads every number from the wrong place:
//! the bug this project exists to catch. So the reordering is explicit,
//! written once, and tested element by element.

use ndarray::{ArrayD, ArrayView4};

use crate::CoreError;

/// A weight as torch holds it: a shape and row-major data.
pub type WeightTensor = ArrayD<f32>;

/// Anything that can hand out state_dict tensors by name: a dump directory,
/// a live torch model through the Python bindings, a test's own map.
pub trait WeightSource {
    fn weight(&self, name: &str) -> Result<WeightTensor, CoreError>;
}

impl WeightSource for std::collections::HashMap<String, WeightTensor> {
    fn weight(&self, name: &str) -> Result<WeightTensor, CoreError> {
        self.get(name)
            .cloned()
            .ok_or_else(|| CoreError::MissingWeight {
                name: name.to_string(),
            })
    }
}

/// Fetches `name` and checks that its shape is `expected`.
pub(crate) fn load_with_shape(
    source: &dyn WeightSource,
    name: &str,
    expected: &[usize],
) -> Result<WeightTensor, CoreError> {
    let tensor = source.weight(name)?;
    if tensor.shape() != expected {
        return Err(CoreError::WeightShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: tensor.shape().to_vec(),
        });
    }
    // `as_standard_layout().into_owned()` would copy even a tensor already
    // in standard layout (every one a dump holds): 100 MB for ResNet50.
    Ok(if tensor.is_standard_layout() {
        tensor
    } else {
        tensor.as_standard_layout().into_owned()
    })
}

/// Reorders a torch conv weight (OIHW) into one GEMM matrix per group.
///
/// The result is `[groups][kernel_y][kernel_x][in_per_group][out_per_group]`,
/// flattened: for group `g`, a row-major `(kernel_y * kernel_x * in_per_group)
/// x out_per_group` matrix. Output channel `o` belongs to group
/// `o / out_per_group`, as in torch.
pub fn conv_weight_from_oihw(weight: ArrayView4<'_, f32>, groups: usize) -> Vec<f32> {
    const TILE: usize = 16;
    let (out_channels, in_per_group, kernel_y, kernel_x) = weight.dim();
    let out_per_group = out_channels / groups;
    let taps = kernel_y * kernel_x;
    let filter_len = in_per_group * taps;
    let weight = weight.as_standard_layout();
    let source = weight.as_slice().expect("standard layout");
    let mut panels = vec![0f32; source.len()];
    // 16 output channels at a time: 16 filters read as 16 sequential
    // streams, each destination row written 16 values (a cache line) at a
    // time. (o, i, tap) goes to (group, tap, i, o within the group).
    for (group, panel) in panels
        .chunks_exact_mut((filter_len * out_per_group).max(1))
        .enumerate()
    {
        let filters = &source[group * out_per_group * filter_len..][..out_per_group * filter_len];
        for first in (0..out_per_group).step_by(TILE) {
            let count = TILE.min(out_per_group - first);
            let tile = &filters[first * filter_len..(first + count) * filter_len];
            for i in 0..in_per_group {
                for tap in 0..taps {
                    let row = (tap * in_per_group + i) * out_per_group + first;
                    for (value, filter) in panel[row..row + count]
                        .iter_mut()
                        .zip(tile.chunks_exact(filter_len))
                    {
                        *value = filter[i * taps + tap];
                    }
                }
            }
        }
    }
    panels
}

/// Transposes a torch linear weight `[out, in]` into the `[in, out]` matrix
/// that multiplies a row of features.
pub fn linear_weight_from_torch(weight: ndarray::ArrayView2<'_, f32>) -> Vec<f32> {
    weight.t().iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array4};

    #[test]
    fn conv_panels_put_each_oihw_element_where_the_gemm_reads_it() {
        let (o, i, kh, kw, groups) = (6, 2, 3, 2, 3);
        let oihw = Array4::from_shape_fn((o, i, kh, kw), |(a, b, c, d)| {
            (a * 1000 + b * 100 + c * 10 + d) as f32
        });
        let panels = conv_weight_from_oihw(oihw.view(), groups);
        let out_per_group = o / groups;
        let rows = kh * kw * i;
        for out in 0..o {
            let (group, column) = (out / out_per_group, out % out_per_group);
            for input in 0..i {
                for y in 0..kh {
                    for x in 0..kw {
                        let row = (y * kw + x) * i + input;
                        let index = group * rows * out_per_group + row * out_per_group + column;
                        assert_eq!(panels[index], oihw[[out, input, y, x]]);
                    }
                }
            }
        }
    }

    #[test]
    fn linear_weight_is_transposed() {
        let weight = Array2::from_shape_fn((3, 2), |(out, input)| (out * 10 + input) as f32);
        assert_eq!(
            linear_weight_from_torch(weight.view()),
            vec![0.0, 10.0, 20.0, 1.0, 11.0, 21.0]
        );
    }

    #[test]
    fn shapes_are_checked_with_both_shapes_named() {
        let mut source = std::collections::HashMap::new();
        source.insert("fc.weight".to_string(), ArrayD::zeros(vec![10, 4]));
        let error = load_with_shape(&source, "fc.weight", &[10, 8]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "weight `fc.weight` has shape [10, 4], but the architecture needs [10, 8]"
        );
        assert!(matches!(
            load_with_shape(&source, "fc.bias", &[10]),
            Err(CoreError::MissingWeight { .. })
        ));
    }
}
