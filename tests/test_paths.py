"""The checkout root, derived once."""
from opd.utils.paths import checkout_root


def test_checkout_root_holds_the_source_and_the_configs():
    root = checkout_root()
    assert (root / "src" / "opd" / "utils" / "paths.py").is_file() and (root / "conf").is_dir()
