from conftest import GOLDEN, load_manifest


def test_golden_folder_is_there_and_complete():
    """Parametrised parity tests would silently shrink to nothing without the data: fail loudly instead."""
    assert (GOLDEN / "MANIFEST.json").is_file(), f"golden data missing at {GOLDEN}"
    m = load_manifest()
    assert len(m["processor_cases"]) >= 28
    assert len(m["embedding_cases"]) >= 45
    assert len(m["merge_cases"]) >= 2
    assert len(m["variant_cases"]) >= 2
