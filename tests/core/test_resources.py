"""Package data: everything the library reads ships inside the package, a user's organism wins over the
shipped one, and commands that write never write into the package."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

import mechintro
from mechintro.cli import commands
from mechintro.core import resources
from mechintro.core.concepts import heldout_concepts
from mechintro.core.models import load_model, spec_for
from mechintro.core.prompts import stimuli

SHIPPED = [
    "stimuli.json",
    "organism_split.json",
    "organism_report.json",
    "organism_report.md",
    "paper_metrics/fig1_metrics_cache.parquet",
    "paper_metrics/fig2_sweep_metrics_cache.parquet",
    "paper_metrics/fig3_metrics_cache.parquet",
]
CHECKPOINT = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "mechintro_spec.json",
]


def test_the_package_data_lies_inside_the_package():
    root = resources.package_data()
    assert root == Path(mechintro.__file__).parent / "data"
    for rel in SHIPPED:
        assert (root / rel).is_file(), rel
    for name in ("organism", "organism-base"):
        for rel in CHECKPOINT:
            assert (root / name / rel).is_file(), f"{name}/{rel}"
    n_layers = json.loads((root / "organism" / "config.json").read_text())["num_hidden_layers"]
    for layer in range(n_layers):
        assert any((root / "organism" / "transcoders" / f"layer_{layer}").iterdir()), layer


def test_user_dir_is_mechintro_data_else_the_per_user_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHINTRO_DATA", str(tmp_path / "mine"))
    assert resources.user_dir() == tmp_path / "mine"
    monkeypatch.delenv("MECHINTRO_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resources.user_dir() == tmp_path / "xdg" / "mechintro"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resources.user_dir() == tmp_path / "home" / ".local" / "share" / "mechintro"


def test_an_empty_user_folder_falls_back_to_the_shipped_organism(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHINTRO_DATA", str(tmp_path))
    assert resources.organism_root() == resources.package_data()
    assert resources.organism_file("organism_split.json").parent == resources.package_data()


def _user_organism(folder: Path, *, strength: float, heldout: list[str]) -> None:
    shipped = resources.package_data()
    shutil.copytree(shipped / "organism", folder / "organism")
    spec_path = folder / "organism" / "mechintro_spec.json"
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps(spec | {"strength": strength}))
    split = json.loads((shipped / "organism_split.json").read_text())
    (folder / "organism_split.json").write_text(json.dumps(split | {"heldout": heldout}))


def test_a_user_organism_wins_with_its_own_split(tmp_path, monkeypatch):
    _user_organism(tmp_path, strength=9.25, heldout=["Bread", "Oceans"])
    monkeypatch.setenv("MECHINTRO_DATA", str(tmp_path))
    assert resources.organism_root() == tmp_path
    model = load_model("organism", device="cpu")
    assert spec_for(model).strength == 9.25
    assert spec_for(model).transcoder_release == str(tmp_path / "organism" / "transcoders")
    assert heldout_concepts() == ["Bread", "Oceans"]
    # the base checkpoint is not in the user's folder: it still comes from the package
    assert resources.organism_root("organism-base") == resources.package_data()
    monkeypatch.delenv("MECHINTRO_DATA")
    assert heldout_concepts() != ["Bread", "Oceans"]


def test_reference_data_comes_from_the_package_whatever_the_user_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHINTRO_DATA", str(tmp_path))
    assert resources.reference("stimuli.json") == resources.package_data() / "stimuli.json"
    assert len(stimuli()["baseline_words"]) == 100
    with pytest.raises(FileNotFoundError, match="not in mechintro's package data"):
        resources.reference("no_such_file.json")


def test_no_organism_anywhere_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHINTRO_DATA", str(tmp_path / "mine"))
    monkeypatch.setattr(resources, "package_data", lambda: tmp_path / "pkg")
    assert resources.organism_root() is None
    with pytest.raises(FileNotFoundError, match=r"mine.*pkg.*organism train"):
        resources.organism_file("organism_split.json")


def test_calibrating_the_shipped_organism_works_on_a_writable_copy(tmp_path, monkeypatch):
    """The package may be read-only (a system install): the copy in the user's folder must be writable."""
    shipped = tmp_path / "pkg"
    shutil.copytree(resources.package_data(), shipped, ignore=shutil.ignore_patterns("paper_metrics"))
    for path in shipped.rglob("*"):
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    monkeypatch.setattr(resources, "package_data", lambda: shipped)
    monkeypatch.setenv("MECHINTRO_DATA", str(tmp_path / "mine"))
    root = commands._writable_organism()
    assert root == tmp_path / "mine" and resources.organism_root() == root
    for name in ("organism", "organism-base"):
        spec = root / name / "mechintro_spec.json"
        assert spec.read_text() == (shipped / name / "mechintro_spec.json").read_text()
        assert spec.stat().st_mode & stat.S_IWUSR, "the copy kept the package's read-only mode"
    assert (root / "organism_split.json").is_file()
    assert commands._writable_organism() == root, "a second call reuses the user's copy"


def test_each_registered_organism_has_its_folder_and_the_olmo_one_lives_in_olmo(tmp_path, monkeypatch):
    """``organism-olmo(-base)`` resolve to ``<data>/olmo/organism(-base)``, the Gemma names to the top level;
    a user's OLMo organism wins over the shipped one without touching the Gemma one."""
    from mechintro.core.models import ORGANISM_NAMES

    assert ORGANISM_NAMES == tuple(resources.ORGANISMS)
    mine = tmp_path / "mine"
    for sub in ("", "olmo"):
        for name in ("organism", "organism-base"):
            (mine / sub / name).mkdir(parents=True)
            (mine / sub / name / "config.json").write_text("{}")
    monkeypatch.setenv("MECHINTRO_DATA", str(mine))
    assert resources.organism_root("organism-olmo") == mine / "olmo"
    assert resources.organism_checkpoint("organism-olmo") == mine / "olmo" / "organism"
    assert resources.organism_checkpoint("organism-olmo-base") == mine / "olmo" / "organism-base"
    assert resources.organism_checkpoint("organism") == mine / "organism"
    assert resources.organism_file("organism_report.json", name="organism-olmo") == (
        mine / "olmo" / "organism_report.json"
    )
    with pytest.raises(
        ValueError, match=r"'organism-llama'.*valid: \['organism', 'organism-base', 'organism-olmo'"
    ):
        resources.organism_root("organism-llama")
    monkeypatch.setattr(resources, "package_data", lambda: tmp_path / "pkg")
    (mine / "olmo" / "organism" / "config.json").unlink()
    assert (
        resources.organism_root("organism-olmo") is None
        and resources.organism_checkpoint("organism-olmo") is None
    )
    assert resources.organism_root("organism-olmo-base") == mine / "olmo"


def test_calibrating_the_olmo_organism_copies_it_into_the_users_olmo_folder(tmp_path, monkeypatch):
    shipped = tmp_path / "pkg"
    for name in ("organism", "organism-base"):
        for sub in ("", "olmo"):
            (shipped / sub / name).mkdir(parents=True)
            (shipped / sub / name / "config.json").write_text(json.dumps({"which": sub or "gemma"}))
    (shipped / "olmo" / "organism_split.json").write_text("{}")
    monkeypatch.setattr(resources, "package_data", lambda: shipped)
    monkeypatch.setenv("MECHINTRO_DATA", str(tmp_path / "mine"))
    root = commands._writable_organism("olmo3")
    assert root == tmp_path / "mine" / "olmo" and resources.organism_root("organism-olmo") == root
    assert json.loads((root / "organism" / "config.json").read_text()) == {"which": "olmo"}
    assert (root / "organism_split.json").is_file()
    assert resources.organism_root() == shipped, "the Gemma organism is still the shipped one"
