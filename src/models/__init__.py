from .backbones import ARCHS, build_backbone, build_encoder, feat_dim, head_attr, strip_head  # noqa: F401
