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
