"""`cbam-train` with torch's default dtype set to float64 before the model and the data are built, so a run
can be compared with another whose float summation order differs (see test_distributed.py). Usage:
python tests/float64_cli.py OVERRIDES..., also as a torchrun script."""

import torch

torch.set_default_dtype(torch.float64)

from cbam_train.cli.command import main  # noqa: E402  after the dtype: the CLI builds its tensors with it

if __name__ == "__main__":
    main()
