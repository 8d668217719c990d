"""The side networks of each backbone family, one module each; adding a family is a module and one line here."""

from __future__ import annotations

from shared.errors import UserError
from side_train.families.decoder import DecoderSideNetwork
from side_train.families.encoder import EncoderSideNetwork
from side_train.families.t5 import T5SideNetwork
from side_train.model import SideNetwork

SIDE_FAMILIES: dict[str, type[SideNetwork]] = {
    "t5": T5SideNetwork,
    "encoder": EncoderSideNetwork,
    "decoder": DecoderSideNetwork,
}


def side_family(name: str) -> type[SideNetwork]:
    """The side network class of a backbone family."""
    try:
        return SIDE_FAMILIES[name]
    except KeyError:
        raise UserError(f"no side network for backbone family {name!r}; known: {', '.join(SIDE_FAMILIES)}") from None
