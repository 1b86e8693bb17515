"""The input: torchvision's standard ImageNet preprocessing."""

import torch
from torchvision import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def resize_for(size):
    """torchvision's pipeline resizes to 256 and crops 224; other sizes keep that ratio."""
    return round(size * 256 / 224)


def load_image(source):
    from PIL import Image

    if source == "cat":
        # scikit-image's `chelsea` sample (CC0), read from the installed package.
        from skimage import data

        return Image.fromarray(data.chelsea()).convert("RGB")
    try:
        return Image.open(source).convert("RGB")
    except OSError as error:
        raise SystemExit(f"--image {source}: cannot read the image: {error}") from None


def make_input(source, size, batch, seed):
    """Returns the NCHW float32 input and its description for the manifest."""
    description = {
        "source": source,
        "size": size,
        "batch": batch,
        "dtype": "float32",
        "layout": "NCHW",
        "color": "RGB",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if source == "random":
        generator = torch.Generator().manual_seed(seed + 1)
        pixels = torch.rand(batch, 3, size, size, generator=generator)
        description["pipeline"] = f"uniform [0, 1) pixels (seed {seed + 1}), normalize(mean, std)"
        return normalize(pixels), description
    resize = resize_for(size)
    pipeline = transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(size),
        transforms.ToTensor(),  # HWC uint8 0-255 -> CHW float 0-1
        normalize,
    ])
    description["pipeline"] = f"resize({resize}, bilinear, antialias), center_crop({size}), to_tensor (0-1), normalize(mean, std)"
    description["resize"] = resize
    image = pipeline(load_image(source))
    return image.unsqueeze(0).repeat(batch, 1, 1, 1).contiguous(), description
