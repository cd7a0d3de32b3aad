"""keras-hub backbones whose BatchNormalization sits inside subclassed blocks, at tiny sizes, and an oracle.

Built from their constructors, no presets or downloads; shared by
tests/test_trace.py and benchmarks/trace.py. Each builder returns a built
model whose input is 32x32x3. `statistics_errors` checks recalibrated
statistics against each BatchNormalization's captured inputs.
"""

import keras
import numpy as np


def _hub():
    """`keras_hub.models`, imported when a builder runs (the oldest-versions leg has no keras-hub)."""
    import keras_hub

    return keras_hub.models


def hgnetv2(image_shape=(32, 32, 3), **options):
    return _hub().HGNetV2Backbone(
        depths=[1, 1],
        embedding_size=8,
        hidden_sizes=[16, 32],
        stem_channels=[3, 8, 8],
        hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[(8, 8, 16, 1, 2, 3), (16, 8, 32, 1, 2, 3)],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
        image_shape=image_shape,
        **options,
    )


def mobilenet_v3_blocks():
    """MobileNetV3 blocks: a residual depthwise block and inverted residual blocks with squeeze-excite."""
    return _hub().MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32]],
        stackwise_num_blocks=[2, 1],
        stackwise_num_filters=[[8, 8], [16]],
        stackwise_kernel_size=[[3, 3], [3]],
        stackwise_num_strides=[[2, 1], [1]],
        stackwise_se_ratio=[[0.25, 0.25], [0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish"]],
        stackwise_padding=[[1, 1], [1]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=1,
        depthwise_residual=True,
        squeeze_and_excite=0.25,
        last_layer_filter=32,
        input_num_filters=8,
        image_shape=(32, 32, 3),
    )


def efficientnet_v2_blocks():
    """EfficientNet with the cba, fused and unfused (MBConv) blocks, all subclassed layers."""
    return _hub().EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3],
        stackwise_num_repeats=[1, 1, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 16],
        stackwise_expansion_ratios=[1, 2, 2],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
        stackwise_strides=[1, 2, 1],
        stackwise_block_types=["cba", "fused", "unfused"],
        stackwise_width_coefficients=[1.0, 1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0, 1.0],
        include_stem_padding=False,
        input_shape=(32, 32, 3),
    )


def mobilenetv5_batch_norm():
    return _hub().MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "uir"]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[8], [16, 16]],
        stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["relu", "relu"]],
        stackwise_exp_ratios=[[2.0], [2.0, 2.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]],
        stackwise_dw_kernel_sizes=[[0], [3, 3]],
        stackwise_dw_start_kernel_sizes=[[0], [0, 0]],
        stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]],
        stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 0]],
        stackwise_key_dims=[[0], [0, 0]],
        stackwise_value_dims=[[0], [0, 0]],
        stackwise_kv_strides=[[0], [0, 0]],
        stackwise_use_cpe=[[False], [False, False]],
        stem_size=8,
        use_msfa=False,
        norm_layer="batch_norm",
        image_shape=(32, 32, 3),
    )


def _resnet_encoder():
    return _hub().ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16, 16, 16],
        stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block",
        image_shape=(32, 32, 3),
    )


def deeplab_v3():
    """DeepLabV3's SpatialPyramidPooling block over a ResNet encoder."""
    return _hub().DeepLabV3Backbone(
        image_encoder=_resnet_encoder(),
        spatial_pyramid_pooling_key="P4",
        upsampling_size=4,
        dilation_rates=[1, 2],
        low_level_feature_key="P2",
        projection_filters=8,
        image_shape=(32, 32, 3),
    )


def retinanet_fpn_batch_norm():
    """RetinaNet's FeaturePyramid with use_fpn_batch_norm (it builds BatchNormalization it never calls)."""
    return _hub().RetinaNetBackbone(
        image_encoder=_resnet_encoder(),
        min_level=3,
        max_level=5,
        use_p5=False,
        use_fpn_batch_norm=True,
        image_shape=(32, 32, 3),
    )


BACKBONES = {
    "hgnetv2": hgnetv2,
    "mobilenet_v3_blocks": mobilenet_v3_blocks,
    "efficientnet_v2_blocks": efficientnet_v2_blocks,
    "mobilenetv5_batch_norm": mobilenetv5_batch_norm,
    "deeplab_v3": deeplab_v3,
    "retinanet_fpn_batch_norm": retinanet_fpn_batch_norm,
}


# The independent oracle for recalibrate -------------------------------------


def batch_norms(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]


def captured_inputs(model, x):
    """Each BatchNormalization's inputs in one eager inference call (`id(layer)` -> list of arrays).

    Independent of bnseq: each layer's `call` is wrapped to record what it is
    given while the model itself runs.
    """
    seen = {}
    wrapped = batch_norms(model)
    for layer in wrapped:
        seen[id(layer)] = []

        def recording(inputs, *args, _layer=layer, _call=layer.call, **kwargs):
            seen[id(_layer)].append(keras.ops.convert_to_numpy(inputs).astype(np.float64))
            return _call(inputs, *args, **kwargs)

        layer.call = recording
    try:
        model(x, training=False)
    finally:
        for layer in wrapped:
            del layer.call
    return seen


def statistics_errors(model, x):
    """`layer name -> the largest difference between its moving statistics and those of its input in inference`.

    Relative to the larger of 1, the largest absolute mean and the largest
    variance; layers the data never reaches are left out.
    """
    captured = captured_inputs(model, x)
    errors = {}
    for layer in batch_norms(model):
        inputs = captured[id(layer)]
        if not inputs:
            continue
        axis = layer.axis % inputs[0].ndim
        values = np.concatenate([np.moveaxis(each, axis, -1).reshape(-1, each.shape[axis]) for each in inputs])
        mean, variance = values.mean(axis=0), values.var(axis=0)
        scale = max(1.0, float(np.abs(mean).max()), float(variance.max()))
        difference = max(
            float(np.abs(keras.ops.convert_to_numpy(layer.moving_mean) - mean).max()),
            float(np.abs(keras.ops.convert_to_numpy(layer.moving_variance) - variance).max()),
        )
        errors[layer.name] = difference / scale
    return errors


def d_fine():
    """D-FINE: its hybrid encoder's call() does not trace; its lateral, FPN and PAN blocks do, on their own."""
    hub = _hub()
    backbone = hgnetv2(image_shape=(None, None, 3), out_features=["stage1", "stage2"])
    return hub.DFineBackbone(
        backbone=backbone, decoder_in_channels=[16, 16], encoder_hidden_dim=16, num_denoising=0, num_labels=4,
        hidden_dim=16, learn_initial_query=False, num_queries=4, anchor_image_size=(32, 32), feat_strides=[4, 8],
        num_feature_levels=2, encoder_in_channels=[16, 32], encode_proj_layers=[1], num_attention_heads=2,
        encoder_ffn_dim=16, num_encoder_layers=1, hidden_expansion=0.5, depth_multiplier=0.5, eval_idx=-1,
        num_decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=16, decoder_n_points=[2, 2],
        lqe_hidden_dim=8, num_lqe_layers=1, out_features=["stage1", "stage2"], image_shape=(None, None, 3), seed=0,
    )
