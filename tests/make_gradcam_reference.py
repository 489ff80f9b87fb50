"""Write tests/data/gradcam_reference.pt: pytorch-grad-cam's GradCAM on the formula-weighted ResNetCBAM of
test_attention.py, the numbers test_grad_cam_matches_pytorch_grad_cam_on_a_fixed_model compares ours with.
Run once where the package is installed (pip install grad-cam==1.5.7): python tests/make_gradcam_reference.py"""

from __future__ import annotations

import torch
from pytorch_grad_cam import GradCAM
from test_attention import REFERENCE, formula_images, formula_weights

from cbam_train.models.resnet import ResNetCBAM

if __name__ == "__main__":
    model = formula_weights(ResNetCBAM(num_classes=10, placement="block"))
    x = formula_images()
    cam = GradCAM(model=model, target_layers=[model.layer4[-1]])(input_tensor=x, targets=None)
    with torch.no_grad():
        pred = model(x).argmax(1)
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save({"cam": torch.from_numpy(cam).float(), "pred": pred, "placement": "block",
                "package": "grad-cam 1.5.7"}, REFERENCE)
    print(f"wrote {REFERENCE}: cam {tuple(cam.shape)}, pred {pred.tolist()}")
