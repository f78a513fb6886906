# UperNet + auxiliary FCN head on our ViT (iBOT paper, ADE20K, 160k iterations).
# Port of the official configs/upernet/vit_{small,base}_512_ade20k_160k.py run with the README
# overrides (out_with_norm=true; lr 3e-5 ViT-S / 8e-5 ViT-B; layer decay 0.9 ViT-S / 0.65 ViT-B;
# decode channels = embed dim). ViT-B/16 values below; the stage sets the rest.
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
        drop_path_rate=0.1,
        out_indices=None,  # official [3, 5, 7, 11], scaled to the depth
        final_norm=True,  # README: model.backbone.out_with_norm=true
        with_adaptor=True,
        norm_cfg={{_base_.norm_cfg}},
        pretrained=None),
    decode_head=dict(
        type='UPerHead',
        in_channels=[embed_dim] * 4,
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=embed_dim,  # official: 384 for ViT-S, 768 for ViT-B
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg={{_base_.norm_cfg}},
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=embed_dim,
        in_index=2,  # the stride-16 level
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg={{_base_.norm_cfg}},
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=8e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='IBOTLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.65, num_layers=None))
