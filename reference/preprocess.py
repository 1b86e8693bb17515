"""The input: torchvision's standard ImageNet preprocessing."""

import torch
from torchvision import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def resize_for(size):
    """torchvision's pipeline resizes to 256 and crops 224; other sizes keep that ratio."""
    return round(size * 256 / 224)


# scikit-image's natural photographs, shipped inside the package (no
# download): `--images samples`. Grey ones are read as RGB.
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera", "coins", "moon",
           "hubble_deep_field", "immunohistochemistry", "retina")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def sample(name):
    from skimage import data

    pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return pixels


# Modes whose values PIL's convert("RGB") (torchvision's loader) clips
# instead of scaling: a 16-bit or float image becomes a white or black frame.
WIDE_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def load_image(source, option="--image"):
    """An image as torchvision's loader opens it (RGB); a file of that name
    before a scikit-image sample's (`cat` is `chelsea`)."""
    from pathlib import Path

    from PIL import Image

    if not Path(source).is_file():
        if source == "cat":
            # scikit-image's `chelsea` sample (CC0), read from the installed package.
            source = "chelsea"
        if source in SAMPLES:
            return Image.fromarray(sample(source)).convert("RGB")
    try:
        image = Image.open(source)
        mode = image.mode
        if mode in WIDE_MODES or mode.startswith("I;16"):
            kind = WIDE_MODES.get(mode, "16-bit")
            raise SystemExit(f"{option} {source}: a {kind} image (PIL mode {mode}): converted to RGB as "
                             "torchvision's loader does, its values would be clipped to a white or black frame; "
                             "save it as 8-bit RGB first")
        return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise SystemExit(f"{option} {source}: cannot read the image: {error}") from None


def image_sources(images):
    """The images `--images` names: `samples` (scikit-image's photographs),
    a directory (its image files, by name), or files."""
    from pathlib import Path

    if list(images) == ["samples"]:
        return list(SAMPLES)
    sources = []
    for image in images:
        path = Path(image)
        if path.is_dir():
            found = sorted(str(file) for file in path.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SystemExit(f"--images {image}: a directory with no image file ({', '.join(IMAGE_SUFFIXES)})")
            sources.extend(found)
        elif image in SAMPLES or path.is_file():
            sources.append(image)
        else:
            raise SystemExit(f"--images {image}: no such file or directory (or `samples` for scikit-image's photos)")
    return sources


def height_width(size):
    """`--size` as (height, width): an int is square."""
    return (size, size) if isinstance(size, int) else tuple(size)


def make_input(source, size, batch, seed, images=None):
    """Returns the NCHW float32 input and its description for the manifest.
    `size`: an int (square) or (height, width); `images`: a list of image
    sources, one batch item each (then `source` and `batch` are not used)."""
    height, width = height_width(size)
    description = {
        "source": "images" if images else source,
        "size": size if isinstance(size, int) else [height, width],
        "batch": len(images) if images else batch,
        "dtype": "float32",
        "layout": "NCHW",
        "color": "RGB",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    if images:
        description["images"] = [str(image) for image in images]
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if source == "random" and not images:
        generator = torch.Generator().manual_seed(seed + 1)
        pixels = torch.rand(batch, 3, height, width, generator=generator)
        description["pipeline"] = f"uniform [0, 1) pixels (seed {seed + 1}), normalize(mean, std)"
        return normalize(pixels), description
    if height == width:
        resize = resize_for(height)
        resize_step, words = transforms.Resize(resize), f"resize({resize}, bilinear, antialias)"
        description["resize"] = resize
    else:
        # The shorter side to torchvision's 256/224 margin over the crop,
        # and the longer one at least as far over its own, so the crop fits.
        resize_step, words = None, None
    crop = height if height == width else (height, width)

    def prepare(image):
        step = resize_step
        if step is None:
            scale = max(resize_for(height) / image.height, resize_for(width) / image.width)
            step = transforms.Resize((round(image.height * scale), round(image.width * scale)))
        return transforms.Compose([step, transforms.CenterCrop(crop), transforms.ToTensor(), normalize])(image)

    if words is None:
        words = (f"resize (bilinear, antialias) by one factor so that height >= {resize_for(height)} and "
                 f"width >= {resize_for(width)}")
    crop_words = f"center_crop({height})" if height == width else f"center_crop({height}x{width})"
    description["pipeline"] = f"{words}, {crop_words}, to_tensor (0-1), normalize(mean, std)"
    if images:
        return torch.stack([prepare(load_image(image, "--images")) for image in images]).contiguous(), description
    image = prepare(load_image(source))
    return image.unsqueeze(0).repeat(batch, 1, 1, 1).contiguous(), description
