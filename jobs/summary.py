"""The job's closing figures: one line on stdout and the same in _summary.json in the output folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

STAT_KEYS = ("rows", "rows_failed", "prompt_tokens", "generated_tokens")


def block_stats(table: pa.Table) -> dict:
    """Counts over one block of output rows (a write task's return value)."""

    def total(column: str) -> int:
        return int(pc.sum(table.column(column)).as_py() or 0)

    return {
        "rows": table.num_rows,
        "rows_failed": table.num_rows - table.column("error").null_count,
        "prompt_tokens": total("num_prompt_tokens"),
        "generated_tokens": total("num_generated_tokens"),
    }


def combine_stats(stats: list[dict]) -> dict:
    return {key: sum(s[key] for s in stats) for key in STAT_KEYS}


@dataclass
class JobSummary:
    rows: int  # rows processed by this run (errors included)
    rows_failed: int
    prompt_tokens: int
    generated_tokens: int
    wall_time_s: float
    rows_skipped: int = 0  # rows already in the output folder from an earlier run
    duplicates_removed: int = 0  # rows both this run and a killed earlier one wrote (resume.remove_duplicates)
    generated_tokens_per_s: float = 0.0

    def __post_init__(self) -> None:
        self.generated_tokens_per_s = self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def line(self) -> str:
        return (
            f"bulk_generate: {self.rows} rows ({self.rows_failed} failed, {self.rows_skipped} already written"
            f"{f', {self.duplicates_removed} written twice, now once' if self.duplicates_removed else ''}), "
            f"{self.prompt_tokens} prompt tokens, {self.generated_tokens} generated tokens, "
            f"{self.wall_time_s:.1f} s, {self.generated_tokens_per_s:.1f} generated tokens/s"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)
