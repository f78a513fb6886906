"""Dense downstream stages (iBOT paper §4.3): COCO detection + instance segmentation with mmdet
(``downstream.dense.detection``) and ADE20K semantic segmentation with mmseg
(``downstream.dense.segmentation``, UperNet or linear head). The shared pieces: the backbone
wrapper registered in both toolboxes (``backbone``), the layer-decay optimizer constructor
(``layer_decay``), the linear head (``linear_head``); ``registry`` registers them all.
Importing this package does not import mmdet/mmseg."""
