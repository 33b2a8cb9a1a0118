"""The coordinator's Flower ``ServerApp`` (FlexOlmo steps 3-5; docs/federation.md).

``flwr run`` starts it on the SuperLink's side with the app's ``[tool.flwr.app.config]`` (see
:class:`~flexmoe.federation.settings.CoordinatorSettings`). It waits for the expected owners,
sends them the spec, validates and keeps every acceptable expert as it arrives, merges the
experts with the public model, tunes the router, exports, and writes ``report.json`` and
``report.md`` into ``out-dir``. The work is :class:`~flexmoe.federation.coordinator.Coordinator`'s.

A run that cannot merge (fewer accepted experts than the quorum, a spec that does not match the
coordinator's public model) writes its report and then raises, so that Flower records the run
as failed (``flwr ls`` shows ``finished:failed``).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexmoe.federation.coordinator import Coordinator
from flexmoe.federation.settings import CoordinatorSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation with the run config's settings (:class:`Coordinator` does the work)."""
    settings = CoordinatorSettings.from_run_config(context.run_config)
    Coordinator(grid, settings, run_id=grid.run.run_id).run()
