"""The PyTorch side: dumps every stage of a torchvision ResNet as a reference."""

SCHEMA_VERSION = 1
FORMAT_NAME = "resnet-verify-dump"
