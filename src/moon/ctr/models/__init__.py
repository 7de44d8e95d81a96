"""The CTR model zoo, one model per file, each extending the one before:

- `dnn.DNN`: ID-only: the sample's and the target item's embedded features and numbers, an MLP;
- `din.DIN`: DNN plus DIN's target attention over the user's behaviour sequence (IDs only);
- `cube.CUBE`: DIN plus CUBE's content-based behaviour extraction over frozen representations.
"""

from moon.ctr.models.cube import CUBE
from moon.ctr.models.din import DIN
from moon.ctr.models.dnn import DNN

MODELS = {"dnn": DNN, "din": DIN, "cube": CUBE}
