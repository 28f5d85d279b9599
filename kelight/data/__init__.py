"""Edit datasets: record formats, the built-in demo set and the LightningDataModule."""

from kelight.data.builtin import builtin_cases, builtin_path
from kelight.data.datamodule import (
    EditDataModule,
    collate_cases,
    load_records,
    select_indices,
)
from kelight.data.formats import (
    detect_format,
    parse_counterfact_edit,
    parse_counterfact_mix,
    parse_record,
    parse_records,
    parse_zsre,
)
from kelight.data.root import default_data_root

__all__ = [
    "EditDataModule",
    "builtin_cases",
    "builtin_path",
    "collate_cases",
    "default_data_root",
    "detect_format",
    "load_records",
    "parse_counterfact_edit",
    "parse_counterfact_mix",
    "parse_record",
    "parse_records",
    "parse_zsre",
    "select_indices",
]
