"""Encoder names: the grammar, the default and which names denote image encoders. Written once,
importable without torch (the API checks names; only jobs that embed load models).

Names:
- ``open_clip:<model>:<pretrained tag | checkpoint path | random>``, e.g. ``open_clip:ViT-B-16:openai``;
- ``efficientnet-lite0``: the offline ImageNet backbone;
- any other short name (no spaces) labels uploaded, precomputed features; it has no model.
"""

from __future__ import annotations

from collections.abc import Iterable

from service.errors import InvalidInput

DEFAULT_ENCODER = "open_clip:ViT-B-16:openai"  # the paper's backbone
OPEN_CLIP_PREFIX = "open_clip:"
EFFICIENTNET_LITE0 = "efficientnet-lite0"
BUILTIN_IMAGE_ENCODERS = (EFFICIENTNET_LITE0,)
MAX_NAME_LENGTH = 200
# Image encoders a tenant may name unless the operator sets DIFFICULTY_ALLOWED_ENCODERS: the
# offline backbone and open_clip's OpenAI weights (published tags, no server paths).
DEFAULT_ALLOWED_ENCODERS = (
    DEFAULT_ENCODER,
    EFFICIENTNET_LITE0,
    "open_clip:ViT-B-32:openai",
    "open_clip:ViT-L-14:openai",
)
EXAMPLES = "'open_clip:<model>:<pretrained tag or checkpoint path>' (e.g. 'open_clip:ViT-B-16:openai'), 'efficientnet-lite0'"


class EncoderError(InvalidInput):
    """The encoder cannot be named, built or used; the message says how to fix it."""


def _shown(name: str) -> str:
    # Error messages echo a bounded prefix of what was sent, never a whole 10,000-character name.
    return repr(name if len(name) <= 80 else name[:80] + "...")


def parse_open_clip_name(name: str) -> tuple[str, str]:
    """``open_clip:ViT-B-16:openai`` -> ("ViT-B-16", "openai"); the tag may be a path with ':'."""
    model, sep, pretrained = name.removeprefix(OPEN_CLIP_PREFIX).partition(":")
    if not name.startswith(OPEN_CLIP_PREFIX) or not model or not sep or not pretrained:
        raise EncoderError(
            f"encoder {_shown(name)} is malformed: open_clip encoders are named "
            "'open_clip:<model>:<pretrained tag or checkpoint path>', e.g. 'open_clip:ViT-B-16:openai' "
            "or 'open_clip:ViT-B-16:/path/to/open_clip_pytorch_model.bin'"
        )
    return model, pretrained


def is_image_encoder(name: str) -> bool:
    """True for names with a model that embeds images; False for labels of uploaded features."""
    return name in BUILTIN_IMAGE_ENCODERS or name.startswith(OPEN_CLIP_PREFIX)


def check_encoder_name(name: str) -> None:
    """Cheap validation (at dataset creation and upload); loading weights happens in the job."""
    if len(name) > MAX_NAME_LENGTH:
        raise EncoderError(f"encoder {_shown(name)} is longer than {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 32 for c in name):
        raise EncoderError(f"encoder {_shown(name)} contains control characters (NUL, newlines, ...)")
    if name.startswith(OPEN_CLIP_PREFIX):
        parse_open_clip_name(name)
    elif not name or any(c.isspace() for c in name):
        raise EncoderError(
            f"encoder {_shown(name)} is not valid: use {EXAMPLES}, or a short name (no spaces, at "
            f"most {MAX_NAME_LENGTH} characters) for precomputed embeddings"
        )


def require_image_encoder(name: str) -> None:
    """Images need a model: refuse names that only label precomputed features."""
    if not is_image_encoder(name):
        raise EncoderError(
            f"the dataset's encoder {_shown(name)} names precomputed embeddings; images need an image "
            f"encoder ({EXAMPLES}): create a dataset with one"
        )


# Prefixes of model families: a name starting with one is taken for an image encoder (a typo
# such as 'efficientnet-lite1' must not silently become a label for precomputed features).
_IMAGE_FAMILIES = ("open_clip", "openclip", "efficientnet")


def looks_like_image_encoder(name: str) -> bool:
    return is_image_encoder(name) or name.lower().startswith(_IMAGE_FAMILIES)


def is_checkpoint_path(name: str) -> bool:
    """An open_clip name whose pretrained part names a file on the server, not a published tag."""
    if not name.startswith(OPEN_CLIP_PREFIX):
        return False
    _, _, pretrained = name.removeprefix(OPEN_CLIP_PREFIX).partition(":")
    return any(c in pretrained for c in "/\\~") or pretrained.startswith(".") or "." in pretrained


def check_tenant_encoder(name: str, allowed: Iterable[str]) -> None:
    """The policy for an encoder a tenant names (dataset creation, before a fit): an image
    encoder must be on the operator's allow-list, exactly (a checkpoint path only when the
    operator listed that path); any other short name labels precomputed features. Nothing is
    looked up on disk or downloaded here, so a refusal says nothing about the server's files."""
    check_encoder_name(name)
    if not looks_like_image_encoder(name):
        return
    allowed = tuple(allowed)
    if name in allowed:
        return
    what = "names a file on the server" if is_checkpoint_path(name) else "is not allowed on this server"
    raise EncoderError(
        f"encoder {_shown(name)} {what}: image encoders here are {', '.join(map(repr, allowed))} "
        "(the operator sets DIFFICULTY_ALLOWED_ENCODERS)"
    )


def check_features_name(name: str) -> None:
    """The ``encoder`` field of an embeddings upload labels features computed elsewhere: it may
    not name (or look like) an image encoder, which the server would then load for images."""
    check_encoder_name(name)
    if looks_like_image_encoder(name):
        raise EncoderError(
            f"{_shown(name)} names an image encoder: uploaded embeddings get a name of their own "
            "(e.g. 'clip-b16-features'); images are embedded by a dataset created with an image encoder"
        )
