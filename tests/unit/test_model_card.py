"""MODEL_CARD.md shows the figures of the model that ships: its block is rendered from model.json."""

from __future__ import annotations

import json

from export.cv_estimate import OutOfFold
from export.model_card import BEGIN, END, block_of, render, update
from tests.conftest import BUNDLED_MODEL, ROOT
from tests.unit.test_shipped_model import PUBLISHED_OOF


def test_the_card_shows_the_shipped_manifests_figures() -> None:
    manifest = json.loads((BUNDLED_MODEL / "model.json").read_text())
    expected = render(manifest, OutOfFold.load(PUBLISHED_OOF))
    card = (ROOT / "MODEL_CARD.md").read_text()
    # If this fails: python -m export.model_card (it rewrites the block from the shipped files).
    assert block_of(card) == expected
    assert f"**{manifest['estimate']['accuracy']:.3f}**" in expected


def test_update_replaces_the_block_and_nothing_else() -> None:
    card = f"# title\nprose before\n{BEGIN}\nold figures\n{END}\nprose after\n"
    new = f"{BEGIN}\nnew figures\n{END}"
    assert update(card, new) == f"# title\nprose before\n{new}\nprose after\n"
    assert block_of(update(card, new)) == new


def test_the_readme_quotes_the_shipped_estimate() -> None:
    e = json.loads((BUNDLED_MODEL / "model.json").read_text())["estimate"]
    figure = f"**{e['accuracy']:.3f} [{e['interval'][0]:.3f}, {e['interval'][1]:.3f}]**"
    # If this fails: README.md's model section quotes an older figure than model.json's estimate.
    assert f"{figure} ({e['method']}, {e['groups']} tissue groups)" in (ROOT / "README.md").read_text()
