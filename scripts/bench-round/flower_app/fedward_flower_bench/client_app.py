"""ClientApp: no training; returns the received arrays plus a constant."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

DELTA = 1e-4


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    trained = [a + DELTA for a in arrays]
    content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": 1000})})
    return Message(content=content, reply_to=msg)
