"""The dump's manifest, built in one place for the dumper (reference.dump)
and for the in-process verification of a live model (resnet_verify). No
torch here: resnet_verify imports it without the dumper's dependencies.
docs/dump-format.md describes the fields."""

from . import FORMAT_NAME, SCHEMA_VERSION

# Written only where given, each at its place in the format's order.
OPTIONAL = ("producer", "model", "architecture", "batch_norms", "input", "dtype", "weights", "top5", "classes")


def build_manifest(*, mode, stages, layout="NCHW", **optional):
    """The manifest as a dict, keys in the format's order (json.dumps keeps
    it, so a dump's bytes do not depend on who built it). `optional` takes
    the sections a reference dump has and a candidate may not: producer,
    model, architecture, batch_norms, input, dtype, weights, top5, classes
    (a section given as None is written as null)."""
    unknown = sorted(set(optional) - set(OPTIONAL))
    if unknown:
        raise TypeError(f"build_manifest: unknown sections {unknown}")

    def given(*keys):
        return {key: optional[key] for key in keys if key in optional}

    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        **given("producer", "model", "architecture"),
        "mode": mode,
        **given("batch_norms", "input"),
        "layout": layout,
        **given("dtype"),
        "stages": stages,
        **given("weights", "top5", "classes"),
    }


def class_names(num_classes):
    """ImageNet's class names (torchvision's) for a 1000-class model; None
    for any other, or where torchvision does not have them."""
    if num_classes != 1000:
        return None
    try:
        import torchvision

        return torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    except (ImportError, AttributeError):
        return None


def noise_floor(single, double):
    """How far a float32 output is from the same computation in float64
    (numpy arrays or torch tensors): the stage's noise floor, what a
    correct float32 implementation can be expected to differ by."""
    import numpy as np

    single = np.asarray(single.detach().cpu() if hasattr(single, "detach") else single, dtype=np.float64)
    double = np.asarray(double.detach().cpu() if hasattr(double, "detach") else double, dtype=np.float64)
    if single.shape != double.shape:
        raise ValueError(f"noise floor: shapes differ: float32 {single.shape}, float64 {double.shape}")
    if single.size == 0:
        return {"max_abs": 0.0, "scale": 0.0, "relative": 0.0, "rms": 0.0}
    error = np.abs(single - double)
    scale = float(np.abs(double).max())
    max_abs = float(error.max())
    return {"max_abs": max_abs, "scale": scale, "relative": max_abs / scale if scale > 0 else 0.0,
            "rms": float(np.sqrt(np.mean(np.square(error))))}

