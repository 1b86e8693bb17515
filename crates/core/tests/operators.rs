//! Every operator against a plain, obviously correct version written here:
//! naive loops in f64, on torch's NCHW / OIHW layouts, over random shapes
//! with odd sizes, strides, padding, dilation and groups.

use ndarray::{Array1, Array2, Array4};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use resnet_core::ops::{
    adaptive_average_pool_1x1, add_relu, relu, BatchNorm, Conv2d, ConvGeometry, Linear, MaxPool2d,
};
use resnet_core::weights::{conv_weight_from_oihw, linear_weight_from_torch};
use resnet_core::Tensor;

fn random_array4(rng: &mut StdRng, shape: (usize, usize, usize, usize)) -> Array4<f32> {
    Array4::from_shape_simple_fn(shape, || rng.random_range(-1.0f32..1.0))
}

/// max |a - b| / max(1, max |b|): the f32 result against the f64 one.
fn assert_close(actual: &Array4<f32>, expected: &Array4<f64>, what: &str) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shape");
    // The max folds below drop NaN (f64::max returns the other operand), so
    // a NaN or infinite output must fail here, not pass as error 0.
    if let Some((index, value)) = actual.indexed_iter().find(|(_, v)| !v.is_finite()) {
        panic!("{what}: output {index:?} is {value}");
    }
    assert!(
        expected.iter().all(|v| v.is_finite()),
        "{what}: the naive result is not finite"
    );
    let scale = expected.iter().fold(1f64, |m, v| m.max(v.abs()));
    let error = actual
        .iter()
        .zip(expected)
        .fold(0f64, |m, (&a, &e)| m.max((a as f64 - e).abs()));
    assert!(
        error / scale < 1e-5,
        "{what}: relative error {:.3e}",
        error / scale
    );
}

fn naive_conv(
    input: &Array4<f32>,
    weight: &Array4<f32>,
    bias: Option<&[f32]>,
    g: &ConvGeometry,
) -> Array4<f64> {
    let (batch, _, height, width) = input.dim();
    let (out_channels, in_per_group, kh, kw) = weight.dim();
    let out_per_group = out_channels / g.groups;
    let out_h = (height + 2 * g.padding[0] - g.dilation[0] * (kh - 1) - 1) / g.stride[0] + 1;
    let out_w = (width + 2 * g.padding[1] - g.dilation[1] * (kw - 1) - 1) / g.stride[1] + 1;
    let mut out = Array4::<f64>::zeros((batch, out_channels, out_h, out_w));
    for n in 0..batch {
        for o in 0..out_channels {
            let group = o / out_per_group;
            for y in 0..out_h {
                for x in 0..out_w {
                    let mut sum = bias.map_or(0.0, |b| b[o] as f64);
                    for i in 0..in_per_group {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (y * g.stride[0] + ky * g.dilation[0]) as isize
                                    - g.padding[0] as isize;
                                let ix = (x * g.stride[1] + kx * g.dilation[1]) as isize
                                    - g.padding[1] as isize;
                                if iy < 0 || ix < 0 || iy >= height as isize || ix >= width as isize
                                {
                                    continue;
                                }
                                let value = input
                                    [[n, group * in_per_group + i, iy as usize, ix as usize]]
                                    as f64;
                                sum += value * weight[[o, i, ky, kx]] as f64;
                            }
                        }
                    }
                    out[[n, o, y, x]] = sum;
                }
            }
        }
    }
    out
}

#[test]
fn conv2d_matches_naive_loops_over_random_geometries() {
    let mut rng = StdRng::seed_from_u64(7);
    for case in 0..60 {
        let groups = [1, 1, 2, 3, 4][rng.random_range(0..5)];
        // 16 channels and more take the packed kernel's patch reading
        // straight from the input (fewer go through im2col).
        let in_per_group = [1, 2, 3, 4, 16, 19][rng.random_range(0..6)];
        let out_per_group = rng.random_range(1..5);
        let kernel = [rng.random_range(1..5), rng.random_range(1..5)];
        let dilation = [rng.random_range(1..3), rng.random_range(1..3)];
        let padding = [rng.random_range(0..3), rng.random_range(0..3)];
        let stride = [rng.random_range(1..4), rng.random_range(1..4)];
        let geometry = ConvGeometry {
            kernel,
            stride,
            padding,
            dilation,
            groups,
        };
        let min_h = (dilation[0] * (kernel[0] - 1) + 1)
            .saturating_sub(2 * padding[0])
            .max(1);
        let min_w = (dilation[1] * (kernel[1] - 1) + 1)
            .saturating_sub(2 * padding[1])
            .max(1);
        let (batch, height, width) = (
            rng.random_range(1..3),
            rng.random_range(min_h..min_h + 9),
            rng.random_range(min_w..min_w + 9),
        );
        let (in_channels, out_channels) = (groups * in_per_group, groups * out_per_group);

        let input = random_array4(&mut rng, (batch, in_channels, height, width));
        let weight = random_array4(&mut rng, (out_channels, in_per_group, kernel[0], kernel[1]));
        let bias: Option<Vec<f32>> = (case % 3 == 0).then(|| {
            (0..out_channels)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect()
        });

        let conv = Conv2d::new(
            in_channels,
            out_channels,
            geometry,
            conv_weight_from_oihw(weight.view(), groups),
            bias.clone(),
        );
        let output = conv
            .forward(&Tensor::from_nchw(input.view()))
            .unwrap()
            .to_nchw();
        let expected = naive_conv(&input, &weight, bias.as_deref(), &geometry);
        assert_close(
            &output,
            &expected,
            &format!("case {case}: {geometry:?}, input {:?}", input.dim()),
        );
    }
}

#[test]
fn conv2d_resnext_sized_groups_and_pointwise_fast_path() {
    let mut rng = StdRng::seed_from_u64(11);
    for geometry in [
        ConvGeometry::square(3, 2, 1, 32),
        ConvGeometry::square(1, 1, 0, 1),
        ConvGeometry::square(1, 2, 0, 1),
        ConvGeometry::square(7, 2, 3, 1),
    ] {
        let (in_channels, out_channels) = (64, 64);
        let input = random_array4(&mut rng, (2, in_channels, 11, 9));
        let weight = random_array4(
            &mut rng,
            (
                out_channels,
                in_channels / geometry.groups,
                geometry.kernel[0],
                geometry.kernel[1],
            ),
        );
        let conv = Conv2d::new(
            in_channels,
            out_channels,
            geometry,
            conv_weight_from_oihw(weight.view(), geometry.groups),
            None,
        );
        let output = conv
            .forward(&Tensor::from_nchw(input.view()))
            .unwrap()
            .to_nchw();
        assert_close(
            &output,
            &naive_conv(&input, &weight, None, &geometry),
            &format!("{geometry:?}"),
        );
    }
}

#[test]
fn conv2d_explains_a_wrong_input() {
    let conv = Conv2d::new(
        4,
        4,
        ConvGeometry::square(3, 1, 0, 1),
        vec![0.0; 4 * 4 * 9],
        None,
    );
    let error = conv.forward(&Tensor::zeros(1, 5, 5, 3)).unwrap_err();
    assert_eq!(error, "expected 4 channels, got 3");
    let error = conv
        .forward(&Tensor::zeros(1, 2, 5, 4))
        .unwrap_err()
        .to_string();
    assert!(error.contains("smaller than"), "{error}");
}

#[test]
fn batch_norm_uses_running_statistics_not_the_batch() {
    let mut rng = StdRng::seed_from_u64(3);
    let channels = 5;
    let parameter = |rng: &mut StdRng, low: f32, high: f32| -> Vec<f32> {
        (0..channels).map(|_| rng.random_range(low..high)).collect()
    };
    let (weight, bias) = (
        parameter(&mut rng, 0.5, 1.5),
        parameter(&mut rng, -0.5, 0.5),
    );
    let (mean, var) = (
        parameter(&mut rng, -2.0, 2.0),
        parameter(&mut rng, 0.01, 3.0),
    );
    let eps = 1e-5;
    let input = random_array4(&mut rng, (2, channels, 3, 7));
    let norm = BatchNorm::from_running_statistics(&weight, &bias, &mean, &var, eps);
    let output = norm
        .forward(&Tensor::from_nchw(input.view()))
        .unwrap()
        .to_nchw();
    let expected = Array4::from_shape_fn(input.dim(), |(n, c, y, x)| {
        (input[[n, c, y, x]] as f64 - mean[c] as f64) / (var[c] as f64 + eps).sqrt()
            * weight[c] as f64
            + bias[c] as f64
    });
    assert_close(&output, &expected, "batch norm");
}

#[test]
fn relu_and_residual_add() {
    let mut rng = StdRng::seed_from_u64(5);
    let a = random_array4(&mut rng, (2, 3, 4, 5));
    let b = random_array4(&mut rng, (2, 3, 4, 5));
    let (ta, tb) = (Tensor::from_nchw(a.view()), Tensor::from_nchw(b.view()));
    assert_close(
        &relu(&ta).to_nchw(),
        &a.mapv(|v| (v as f64).max(0.0)),
        "relu",
    );
    let expected = Array4::from_shape_fn(a.dim(), |i| (a[i] as f64 + b[i] as f64).max(0.0));
    assert_close(
        &add_relu(&ta, &tb).unwrap().to_nchw(),
        &expected,
        "add relu",
    );
    assert_eq!(
        add_relu(&ta, &Tensor::zeros(2, 4, 5, 4)).unwrap_err(),
        "the residual [2, 4, 5, 3] and the identity [2, 4, 5, 4] must have the same shape"
    );
}

#[test]
fn max_pool_treats_padding_as_minus_infinity() {
    let mut rng = StdRng::seed_from_u64(9);
    for (kernel, stride, padding, height, width) in [
        (3, 2, 1, 7, 8),
        (3, 2, 1, 112, 111),
        (2, 2, 0, 5, 5),
        (3, 1, 1, 4, 3),
    ] {
        // All negative: a zero-padded pool would return 0 at the borders.
        let input =
            Array4::from_shape_simple_fn((2, 3, height, width), || rng.random_range(-2.0f32..-0.1));
        let pool = MaxPool2d {
            kernel,
            stride,
            padding,
        };
        let output = pool
            .forward(&Tensor::from_nchw(input.view()))
            .unwrap()
            .to_nchw();
        let (out_h, out_w) = (
            (height + 2 * padding - kernel) / stride + 1,
            (width + 2 * padding - kernel) / stride + 1,
        );
        let expected = Array4::from_shape_fn((2, 3, out_h, out_w), |(n, c, y, x)| {
            let mut best = f64::NEG_INFINITY;
            for ky in 0..kernel {
                for kx in 0..kernel {
                    let (iy, ix) = (
                        (y * stride + ky) as isize - padding as isize,
                        (x * stride + kx) as isize - padding as isize,
                    );
                    if iy >= 0 && ix >= 0 && (iy as usize) < height && (ix as usize) < width {
                        best = best.max(input[[n, c, iy as usize, ix as usize]] as f64);
                    }
                }
            }
            best
        });
        assert_close(
            &output,
            &expected,
            &format!("max pool {kernel}/{stride}/{padding} on {height}x{width}"),
        );
        assert!(output.iter().all(|&v| v < 0.0));
    }
}

#[test]
fn adaptive_average_pool_and_linear() {
    let mut rng = StdRng::seed_from_u64(13);
    let input = random_array4(&mut rng, (3, 6, 5, 7));
    let pooled = adaptive_average_pool_1x1(&Tensor::from_nchw(input.view()));
    let expected = Array4::from_shape_fn((3, 6, 1, 1), |(n, c, _, _)| {
        input
            .slice(ndarray::s![n, c, .., ..])
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>()
            / 35.0
    });
    assert_close(&pooled.to_nchw(), &expected, "average pool");

    let (features, classes) = (6, 4);
    let weight =
        Array2::from_shape_simple_fn((classes, features), || rng.random_range(-1.0f32..1.0));
    let bias = Array1::from_shape_simple_fn(classes, || rng.random_range(-1.0f32..1.0));
    let linear = Linear::new(
        features,
        classes,
        linear_weight_from_torch(weight.view()),
        bias.to_vec(),
    );
    let logits = linear.forward(&pooled).unwrap().to_nchw();
    let pooled = pooled.to_nchw();
    let expected = Array4::from_shape_fn((3, classes, 1, 1), |(n, k, _, _)| {
        (0..features)
            .map(|f| pooled[[n, f, 0, 0]] as f64 * weight[[k, f]] as f64)
            .sum::<f64>()
            + bias[k] as f64
    });
    assert_close(&logits, &expected, "linear");
}
