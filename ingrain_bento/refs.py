"""Model identity: ``ModelRef(library, name, pretrained)``, a plain value.

Every name a client sends passes through ``families.parse_ref`` (``validate_name`` here, then the
family's own reading of ``pretrained``) before anything touches the store or the disk: names are
plain identifiers (an optional ``hf-hub:`` prefix and one ``org/repo`` slash), never paths.
``ModelRef`` derives the display id (``name`` or ``name::pretrained``); its store tag is the
store's (``store.store_name``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ingrain_bento.errors import BadRequest

__all__ = ["DISPLAY_SEPARATOR", "HF_HUB_PREFIX", "ModelRef", "split_display_id", "validate_name", "validate_tag"]

HF_HUB_PREFIX = "hf-hub:"
DISPLAY_SEPARATOR = "::"
MAX_NAME_CHARS = 200

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
_NAME_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})?$")
_TAG_RE = re.compile(rf"^{_SEGMENT}$")


def _check_plain(value: str, what: str, pattern: re.Pattern[str]) -> None:
    if not value:
        raise BadRequest(f"The {what} is empty: give a model {what}.")
    if len(value) > MAX_NAME_CHARS:
        raise BadRequest(f"The {what} is longer than {MAX_NAME_CHARS} characters.")
    if ".." in value or not pattern.fullmatch(value):
        raise BadRequest(
            f"The {what} {value!r} is not a plain identifier: use letters, digits, '.', '_', '-' "
            "(and one '/' for an org/repo id), without '..', paths or control characters."
        )


def validate_name(name: str) -> str:
    """Check a model name (optionally ``hf-hub:org/repo``) and return its canonical form."""
    if name.startswith("hf_hub:"):
        name = HF_HUB_PREFIX + name[len("hf_hub:"):]
    bare = name[len(HF_HUB_PREFIX):] if name.startswith(HF_HUB_PREFIX) else name
    _check_plain(bare, "name", _NAME_RE)
    if name.startswith(HF_HUB_PREFIX) and "/" not in bare:
        raise BadRequest(f"{name!r} needs an org/repo after 'hf-hub:'.")
    return name


def validate_tag(tag: str, what: str = "pretrained tag") -> str:
    """Check a pretrained tag or custom checkpoint name (no slashes at all)."""
    _check_plain(tag, what, _TAG_RE)
    return tag


def split_display_id(name: str, pretrained: str | bool | None) -> tuple[str, str | bool | None]:
    """Accept ``name::pretrained`` in any name field (the current client never sends ``pretrained``)."""
    if DISPLAY_SEPARATOR not in name:
        return name, pretrained
    base, _, tag = name.partition(DISPLAY_SEPARATOR)
    if pretrained not in (None, tag) and str(pretrained).lower() != tag.lower():
        raise BadRequest(f"The name {name!r} names pretrained {tag!r} but the request also sent {pretrained!r}.")
    return base, tag


@dataclass(frozen=True)
class ModelRef:
    """One model: which library opens it, its name, and its weights.

    ``pretrained`` is canonical per library (``Family.canonical_pretrained``): open_clip a
    tag or custom name (``None`` only for ``hf-hub:`` names); sentence-transformers always
    ``None``; timm ``None`` for the pretrained weights, ``"false"`` for random weights, else a
    custom checkpoint name.
    """

    library: str
    name: str
    pretrained: str | None = None

    @property
    def is_hub_name(self) -> bool:
        return self.name.startswith(HF_HUB_PREFIX)

    @property
    def display_id(self) -> str:
        """``name`` or ``name::pretrained`` (the clip-as-service convention)."""
        return self.name if self.pretrained is None else f"{self.name}{DISPLAY_SEPARATOR}{self.pretrained}"
