"""What every job's ``main`` does: flags -> config -> run -> one summary line; bad input -> exit 2."""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from rmt_dist.config import ConfigError, exit_on_config_error, parse_args


def run_job(job: str, presets: Mapping[str, Mapping[str, Any]], argv: Sequence[str] | None = None,
            aliases: Mapping[str, str] | None = None) -> int:
    from rmt_dist.data import DataError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv, presets, aliases=aliases)
        from rmt_dist.train.driver import run_training, summary_line  # heavy imports after the flags are good

        summary = run_training(cfg, job)
    except (ConfigError, DataError) as err:
        exit_on_config_error(ConfigError(str(err)))
    except Exception as err:  # a failed run: one readable line; details are in Ray's logs
        from rmt_dist.storage import whole_line

        print(f"error: training failed: {whole_line(err)}", file=sys.stderr)
        return 1
    print(summary_line(summary))
    from rmt_dist.tracking import tracking_uri

    uri = tracking_uri(cfg)
    if summary.mlflow_run_id:
        print(f"see it: {uri}" if uri.startswith("http") else f"see it: mlflow ui --backend-store-uri {uri}")
    return 0
