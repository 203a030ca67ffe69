import os

from conftest import GOLDEN, IN_REPO_GOLDEN, load_manifest


def test_golden_folder_is_there_and_complete():
    """Parametrised parity tests would silently shrink to nothing without the data: fail loudly instead."""
    assert (GOLDEN / "MANIFEST.json").is_file(), f"golden data missing at {GOLDEN}"
    m = load_manifest()
    assert len(m["processor_cases"]) >= 28
    assert len(m["embedding_cases"]) >= 45
    assert len(m["merge_cases"]) >= 2
    assert len(m["variant_cases"]) >= 2


def test_the_in_repo_golden_set_is_the_default():
    """The trimmed set ships with the repository; PHI3EMBED_GOLDEN (e.g. the full set) is the only override."""
    assert (IN_REPO_GOLDEN / "MANIFEST.json").is_file() and (IN_REPO_GOLDEN / "README.md").is_file()
    if not os.environ.get("PHI3EMBED_GOLDEN"):
        assert IN_REPO_GOLDEN.resolve() == GOLDEN
        assert load_manifest()["subset"]["written_by"] == "tests/data/trim_golden.py"
    for case in load_manifest()["embedding_cases"]:  # every file the tests open is there, in either set
        assert (GOLDEN / case["file"]).is_file(), case["file"]
        assert (GOLDEN / case["image"]).is_file(), case["image"]
