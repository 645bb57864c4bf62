"""ServerApp: FedAvg over every tensor of the bench's layout, no evaluation; each round's
start (configure_train, the offer) and end (aggregate_train done) logged to the timing file."""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, timing_file, **kwargs):
        super().__init__(**kwargs)
        self.timing_file = timing_file

    def _note(self, event, server_round):
        with open(self.timing_file, "a") as f:
            f.write(json.dumps({"event": event, "round": server_round, "t": time.time()}) + "\n")

    def configure_train(self, server_round, arrays, config, grid):
        self._note("offer", server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        self._note("aggregated", server_round)
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    with open(cfg["layout"]) as f:
        layout = json.load(f)
    rng = np.random.default_rng(42)
    arrays = [rng.uniform(-0.05, 0.05, size=t["shape"]).astype(np.float32) for t in layout]
    sites = int(cfg["num-sites"])
    strategy = TimedFedAvg(
        cfg["timing-file"],
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=sites,
        min_available_nodes=sites,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(arrays),
        train_config=ConfigRecord({}),
        num_rounds=int(cfg["num-rounds"]),
    )
