"""File formats, one module per format: training checkpoints (``checkpoint``), TorchScript archives read as data
(``torchscript``), MONAI bundles (``bundle``), the model card a checkpoint carries (``card``) and verified downloads
(``download``). What a file holds is read and written here; which network it fits is the model's business."""
