# Linear head on the frozen ViT (iBOT paper, ADE20K, 160k iterations).
# Port of the official configs/linear/vit_base_512_ade20k_160k.py run with the README overrides
# (out_with_norm=true, lr 8e-4): blocks [3, 5, 7, 11] after the final norm, concatenated at
# stride 16, one 1x1 conv (FCNHead num_convs=0 == IBOTLinearSegHead with_bn=False); the ViT is
# frozen (frozen_stages=12: no gradients, eval mode); plain AdamW, no layer decay.
_base_ = ['./ade20k_160k_base.py']

embed_dim = 768
model = dict(
    type='EncoderDecoder',
    data_preprocessor={{_base_.data_preprocessor}},
    backbone=dict(
        type='IBOTViTDense',
        arch='vit_base',
        patch_size=16,
        depth=None,
        drop_path_rate=0.0,
        out_indices=None,  # official [3, 5, 7, 11], scaled to the depth
        final_norm=True,
        with_adaptor=False,
        frozen=True,
        pretrained=None),
    decode_head=dict(
        type='IBOTLinearSegHead',
        in_channels=[embed_dim] * 4,
        in_index=[0, 1, 2, 3],
        input_transform='resize_concat',
        channels=embed_dim * 4,
        with_bn=False,
        dropout_ratio=0.0,
        num_classes=150,
        norm_cfg={{_base_.norm_cfg}},
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))

optim_wrapper = dict(optimizer=dict(type='AdamW', lr=8e-4, betas=(0.9, 0.999), weight_decay=0.05))
