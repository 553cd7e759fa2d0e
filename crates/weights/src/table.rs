//! The entries of the weights table.
//!
//! Sources:
//! - Hub backbones: timm's ports on the Hugging Face Hub (`timm/<model>.<tag>`); revisions are the commit
//!   hashes shown on each repository's history page where one could be found (`main` otherwise), licenses
//!   from each model card. timm's `pretrained_cfg` gives the input size and normalisation
//!   (`xception_aligned.py`: 299x299, inception mean/std; `resnet.py` tv weights and `efficientnet.py`
//!   MobileNetV2: 224x224, ImageNet mean/std).
//! - Model zoo: `tensorflow/models` `research/deeplab/g3doc/model_zoo.md` (names, exact archive URLs,
//!   eval output stride, scales, flips, mIoU, file sizes), `pascal.md` / `cityscapes.md` / `ade20k.md`
//!   (train output stride 16, atrous rates 6/12/18 at OS16, decoder output stride 4, crop sizes) and
//!   `core/feature_extractor.py` (every official variant, `resnet_v1_*_beta` included, normalises with
//!   `x * 2 / 255 - 1`). No sha256 is published for the archives, so none is recorded.
use crate::{
    HeadSpec, Metric, ModelSpec, Normalization, Preprocess, Source, WeightKind, WeightSpec,
};

const TIMM_LICENSE_APACHE: &str = "apache-2.0";
const TORCHVISION_LICENSE: &str = "bsd-3-clause";
const MODEL_ZOO_LICENSE: &str = "apache-2.0";
const MODEL_ZOO: &str = "tensorflow/models research/deeplab/g3doc/model_zoo.md";

/// DeepLabv3+ head of the Xception-65 models: ASPP 6/12/18 at OS16 + image pooling, decoder at OS4,
/// separable convs everywhere.
const V3PLUS_HEAD: HeadSpec = HeadSpec {
    atrous_rates_os16: Some([6, 12, 18]),
    image_pooling: true,
    decoder_output_stride: Some(4),
    separable: true,
    aspp_channels: 256,
};

/// The model-zoo MobileNetV2 head: image pooling + 1x1 branch only, no decoder.
const MOBILE_HEAD: HeadSpec = HeadSpec {
    atrous_rates_os16: None,
    image_pooling: true,
    decoder_output_stride: None,
    separable: true,
    aspp_channels: 256,
};

const INCEPTION_513: Preprocess = Preprocess {
    normalization: Normalization::Inception,
    input_size: [513, 513],
    pad_value: 127.5,
};

const INCEPTION_CITYSCAPES: Preprocess = Preprocess {
    normalization: Normalization::Inception,
    input_size: [1025, 2049],
    pad_value: 127.5,
};

const TIMM_XCEPTION: Preprocess = Preprocess {
    normalization: Normalization::Inception,
    input_size: [299, 299],
    pad_value: 127.5,
};

const TIMM_IMAGENET_224: Preprocess = Preprocess {
    normalization: Normalization::ImageNet,
    input_size: [224, 224],
    // ImageNet mean in 0..255, which normalises to 0.
    pad_value: 123.675,
};

const fn backbone_model(
    backbone: &'static str,
    width: f32,
    classes: Option<u32>,
    input: u32,
) -> ModelSpec {
    ModelSpec {
        backbone,
        width_multiplier: width,
        multi_grid: None,
        train_output_stride: Some(32),
        eval_output_stride: 32,
        head: None,
        num_classes: classes,
        crop_size: [input, input],
    }
}

const fn seg_model(
    backbone: &'static str,
    width: f32,
    train_os: Option<u32>,
    eval_os: u32,
    head: HeadSpec,
    classes: u32,
    crop: [u32; 2],
) -> ModelSpec {
    ModelSpec {
        backbone,
        width_multiplier: width,
        multi_grid: None,
        train_output_stride: train_os,
        eval_output_stride: eval_os,
        head: Some(head),
        num_classes: Some(classes),
        crop_size: crop,
    }
}

const fn voc(value: f32, split: &'static str, protocol: &'static str) -> Option<Metric> {
    Some(Metric {
        dataset: split,
        name: "mIoU",
        value,
        protocol,
        reference: MODEL_ZOO,
    })
}

const fn hub(repo: &'static str, revision: &'static str) -> Source {
    Source::Hub {
        repo,
        revision,
        file: "model.safetensors",
    }
}

#[rustfmt::skip]
pub(crate) const TABLE: &[WeightSpec] = &[
    // ---- ImageNet backbones on the Hugging Face Hub (timm names: load with no renaming) ----
    WeightSpec {
        name: "xception41.tf_in1k",
        aliases: &["timm/xception41.tf_in1k"],
        description: "Aligned Xception-41, official DeepLab ImageNet weights ported to PyTorch by timm",
        kind: WeightKind::Backbone,
        source: hub("timm/xception41.tf_in1k", "2dd4221154563cec010f641b675fb4a06376ff9b"),
        size: None, approx_size: "108MB", sha256: None,
        model: backbone_model("xception41", 1.0, Some(1000), 299),
        preprocess: TIMM_XCEPTION,
        license: TIMM_LICENSE_APACHE, metric: None, timm_keys: Some("xception41"),
    },
    WeightSpec {
        name: "xception65.tf_in1k",
        aliases: &["timm/xception65.tf_in1k"],
        description: "Aligned Xception-65, the official DeepLab ImageNet checkpoint ported by timm (the paper's starting point)",
        kind: WeightKind::Backbone,
        // No full commit hash of this repository could be found offline: `main` (verified by LFS sha256).
        source: hub("timm/xception65.tf_in1k", "main"),
        size: None, approx_size: "160MB", sha256: None,
        model: backbone_model("xception65", 1.0, Some(1000), 299),
        preprocess: TIMM_XCEPTION,
        license: TIMM_LICENSE_APACHE, metric: None, timm_keys: Some("xception65"),
    },
    WeightSpec {
        name: "xception71.tf_in1k",
        aliases: &["timm/xception71.tf_in1k"],
        description: "Aligned Xception-71, official DeepLab ImageNet weights ported by timm",
        kind: WeightKind::Backbone,
        source: hub("timm/xception71.tf_in1k", "main"),
        size: None, approx_size: "170MB", sha256: None,
        model: backbone_model("xception71", 1.0, Some(1000), 299),
        preprocess: TIMM_XCEPTION,
        license: TIMM_LICENSE_APACHE, metric: None, timm_keys: Some("xception71"),
    },
    WeightSpec {
        name: "resnet50.tv_in1k",
        aliases: &["timm/resnet50.tv_in1k"],
        description: "ResNet-50 (torchvision ImageNet weights, timm names)",
        kind: WeightKind::Backbone,
        source: hub("timm/resnet50.tv_in1k", "78f3ecfdb38e06d9b8397f662e7ab8fee96026fa"),
        size: None, approx_size: "?", sha256: None,
        model: backbone_model("resnet50", 1.0, Some(1000), 224),
        preprocess: TIMM_IMAGENET_224,
        license: TORCHVISION_LICENSE, metric: None, timm_keys: Some("resnet50"),
    },
    WeightSpec {
        name: "resnet101.tv_in1k",
        aliases: &["timm/resnet101.tv_in1k"],
        description: "ResNet-101 (torchvision ImageNet weights, timm names)",
        kind: WeightKind::Backbone,
        source: hub("timm/resnet101.tv_in1k", "main"),
        size: None, approx_size: "179MB", sha256: None,
        model: backbone_model("resnet101", 1.0, Some(1000), 224),
        preprocess: TIMM_IMAGENET_224,
        license: TORCHVISION_LICENSE, metric: None, timm_keys: Some("resnet101"),
    },
    WeightSpec {
        name: "mobilenetv2_100.ra_in1k",
        aliases: &["timm/mobilenetv2_100.ra_in1k"],
        description: "MobileNetV2 1.0 (timm RandAugment ImageNet training)",
        kind: WeightKind::Backbone,
        source: hub("timm/mobilenetv2_100.ra_in1k", "f3ff81ba89de0bc46b546568ebeab2edef6b9d49"),
        size: None, approx_size: "14.2MB", sha256: None,
        model: backbone_model("mobilenetv2_100", 1.0, Some(1000), 224),
        preprocess: TIMM_IMAGENET_224,
        license: TIMM_LICENSE_APACHE, metric: None, timm_keys: Some("mobilenetv2_100"),
    },
    WeightSpec {
        name: "mobilenetv2_050.lamb_in1k",
        aliases: &["timm/mobilenetv2_050.lamb_in1k"],
        description: "MobileNetV2 0.5 (timm LAMB ImageNet training)",
        kind: WeightKind::Backbone,
        source: hub("timm/mobilenetv2_050.lamb_in1k", "main"),
        size: None, approx_size: "?", sha256: None,
        model: backbone_model("mobilenetv2_050", 0.5, Some(1000), 224),
        preprocess: TIMM_IMAGENET_224,
        license: TIMM_LICENSE_APACHE, metric: None, timm_keys: Some("mobilenetv2_050"),
    },

    // ---- Official DeepLab model zoo: PASCAL VOC 2012 ----
    WeightSpec {
        name: "xception65_coco_voc_trainaug",
        aliases: &["xception_coco_voc_trainaug", "xception_coco_voctrainaug"],
        description: "DeepLabv3+ Xception-65, COCO + VOC 2012 train_aug (BN fine-tuned)",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_pascal_train_aug_2018_01_04.tar.gz" },
        size: None, approx_size: "439MB", sha256: None,
        model: seg_model("xception65", 1.0, Some(16), 16, V3PLUS_HEAD, 21, [513, 513]),
        preprocess: INCEPTION_513,
        license: MODEL_ZOO_LICENSE,
        metric: voc(82.20, "PASCAL VOC 2012 val", "OS16, single scale, no flip (83.58 at OS8, scales 0.5:0.25:1.75 + flip)"),
        timm_keys: None,
    },
    WeightSpec {
        name: "xception65_coco_voc_trainval",
        aliases: &["xception_coco_voc_trainval", "xception_coco_voctrainval"],
        description: "DeepLabv3+ Xception-65, COCO + VOC 2012 train_aug + trainval (for the test server / demos)",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_pascal_trainval_2018_01_04.tar.gz" },
        size: None, approx_size: "439MB", sha256: None,
        model: seg_model("xception65", 1.0, None, 8, V3PLUS_HEAD, 21, [513, 513]),
        preprocess: INCEPTION_513,
        license: MODEL_ZOO_LICENSE,
        metric: voc(87.80, "PASCAL VOC 2012 test", "OS8, scales 0.5:0.25:1.75, flip"),
        timm_keys: None,
    },
    WeightSpec {
        name: "mobilenetv2_coco_voc_trainaug",
        aliases: &["mobilenetv2_coco_voctrainaug"],
        description: "DeepLabv3 MobileNetV2 1.0 (image pooling + 1x1 ASPP, no decoder), COCO + VOC 2012 train_aug",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz" },
        size: None, approx_size: "23MB", sha256: None,
        model: seg_model("mobilenetv2_100", 1.0, Some(16), 16, MOBILE_HEAD, 21, [513, 513]),
        preprocess: INCEPTION_513,
        license: MODEL_ZOO_LICENSE,
        metric: voc(75.32, "PASCAL VOC 2012 val", "OS16, single scale, no flip (77.33 at OS8, scales 0.5:0.25:1.75 + flip)"),
        timm_keys: None,
    },
    WeightSpec {
        name: "mobilenetv2_coco_voc_trainval",
        aliases: &["mobilenetv2_coco_voctrainval"],
        description: "DeepLabv3 MobileNetV2 1.0, COCO + VOC 2012 train_aug + trainval",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_mnv2_pascal_trainval_2018_01_29.tar.gz" },
        size: None, approx_size: "23MB", sha256: None,
        model: seg_model("mobilenetv2_100", 1.0, None, 8, MOBILE_HEAD, 21, [513, 513]),
        preprocess: INCEPTION_513,
        license: MODEL_ZOO_LICENSE,
        metric: voc(80.25, "PASCAL VOC 2012 test", "OS8, scales 0.5:0.25:1.75, flip"),
        timm_keys: None,
    },
    WeightSpec {
        name: "mobilenetv2_dm05_coco_voc_trainaug",
        aliases: &[],
        description: "DeepLabv3 MobileNetV2 depth multiplier 0.5, COCO + VOC 2012 train_aug",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_mnv2_dm05_pascal_trainaug_2018_10_01.tar.gz" },
        size: None, approx_size: "7.6MB", sha256: None,
        model: seg_model("mobilenetv2_050", 0.5, None, 16, MOBILE_HEAD, 21, [513, 513]),
        preprocess: INCEPTION_513,
        license: MODEL_ZOO_LICENSE,
        metric: voc(70.19, "PASCAL VOC 2012 val", "OS16, single scale, no flip"),
        timm_keys: None,
    },
    WeightSpec {
        name: "mobilenetv2_dm05_coco_voc_trainval",
        aliases: &[],
        description: "DeepLabv3 MobileNetV2 depth multiplier 0.5, COCO + VOC 2012 train_aug + trainval",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_mnv2_dm05_pascal_trainval_2018_10_01.tar.gz" },
        size: None, approx_size: "7.6MB", sha256: None,
        model: seg_model("mobilenetv2_050", 0.5, None, 8, MOBILE_HEAD, 21, [513, 513]),
        preprocess: INCEPTION_513,
        license: MODEL_ZOO_LICENSE,
        metric: voc(71.83, "PASCAL VOC 2012 test", "OS8, single scale, no flip"),
        timm_keys: None,
    },

    // ---- Official DeepLab model zoo: Cityscapes ----
    WeightSpec {
        name: "mobilenetv2_coco_cityscapes_trainfine",
        aliases: &[],
        description: "DeepLabv3 MobileNetV2 1.0, COCO + Cityscapes train_fine (19 classes)",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_mnv2_cityscapes_train_2018_02_05.tar.gz" },
        size: None, approx_size: "23MB", sha256: None,
        model: seg_model("mobilenetv2_100", 1.0, None, 16, MOBILE_HEAD, 19, [1025, 2049]),
        preprocess: INCEPTION_CITYSCAPES,
        license: MODEL_ZOO_LICENSE,
        metric: voc(70.71, "Cityscapes val", "OS16, single scale, no flip (73.57 at OS8, scales 0.75:0.25:1.25 + flip)"),
        timm_keys: None,
    },
    WeightSpec {
        name: "xception65_cityscapes_trainfine",
        aliases: &["xception_cityscapes_trainfine"],
        description: "DeepLabv3+ Xception-65, ImageNet + Cityscapes train_fine (19 classes)",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_cityscapes_train_2018_02_06.tar.gz" },
        size: None, approx_size: "439MB", sha256: None,
        model: seg_model("xception65", 1.0, Some(16), 16, V3PLUS_HEAD, 19, [1025, 2049]),
        preprocess: INCEPTION_CITYSCAPES,
        license: MODEL_ZOO_LICENSE,
        metric: voc(78.79, "Cityscapes val", "OS16, single scale, no flip (80.42 at OS8, scales 0.75:0.25:1.25 + flip)"),
        timm_keys: None,
    },

    // ---- Official DeepLab model zoo: ADE20K (151 classes, 0 = ignore) ----
    WeightSpec {
        name: "xception65_ade20k_train",
        aliases: &["xception_ade20k_train"],
        description: "DeepLabv3+ Xception-65, ImageNet + ADE20K train (151 classes, inputs resized to 513)",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_xception_ade20k_train_2018_05_29.tar.gz" },
        size: None, approx_size: "439MB", sha256: None,
        model: seg_model("xception65", 1.0, Some(16), 8, V3PLUS_HEAD, 151, [513, 513]),
        preprocess: INCEPTION_513,
        license: MODEL_ZOO_LICENSE,
        metric: voc(45.65, "ADE20K val", "OS8, scales 0.5:0.25:1.75, flip (pixel accuracy 82.52)"),
        timm_keys: None,
    },
    WeightSpec {
        name: "mobilenetv2_ade20k_train",
        aliases: &[],
        description: "DeepLabv3+ MobileNetV2 1.0 with decoder, ImageNet + ADE20K train (151 classes, inputs resized to 257)",
        kind: WeightKind::Segmentation,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_mnv2_ade20k_train_2018_12_03.tar.gz" },
        size: None, approx_size: "24.8MB", sha256: None,
        model: seg_model(
            "mobilenetv2_100", 1.0, None, 16,
            HeadSpec { decoder_output_stride: Some(4), ..MOBILE_HEAD },
            151, [257, 257],
        ),
        preprocess: Preprocess { input_size: [257, 257], ..INCEPTION_513 },
        license: MODEL_ZOO_LICENSE,
        metric: voc(32.04, "ADE20K val", "OS16, single scale, no flip (pixel accuracy 75.41)"),
        timm_keys: None,
    },

    // ---- Official DeepLab model zoo: ImageNet-pretrained TensorFlow backbones ----
    WeightSpec {
        name: "xception_41_imagenet",
        aliases: &["xception_41"],
        description: "Official DeepLab Xception-41 ImageNet checkpoint (TensorFlow)",
        kind: WeightKind::Backbone,
        source: Source::Archive { url: "http://download.tensorflow.org/models/xception_41_2018_05_09.tar.gz" },
        size: None, approx_size: "288MB", sha256: None,
        model: backbone_model("xception41", 1.0, None, 299),
        preprocess: TIMM_XCEPTION,
        license: MODEL_ZOO_LICENSE, metric: None, timm_keys: None,
    },
    WeightSpec {
        name: "xception_65_imagenet",
        aliases: &["xception_65"],
        description: "Official DeepLab Xception-65 ImageNet checkpoint (TensorFlow)",
        kind: WeightKind::Backbone,
        source: Source::Archive { url: "http://download.tensorflow.org/models/deeplabv3_xception_2018_01_04.tar.gz" },
        size: None, approx_size: "447MB", sha256: None,
        model: backbone_model("xception65", 1.0, None, 299),
        preprocess: TIMM_XCEPTION,
        license: MODEL_ZOO_LICENSE, metric: None, timm_keys: None,
    },
    WeightSpec {
        name: "xception_65_imagenet_coco",
        aliases: &[],
        description: "Official DeepLab Xception-65 checkpoint pretrained on ImageNet then COCO (TensorFlow)",
        kind: WeightKind::Backbone,
        source: Source::Archive { url: "http://download.tensorflow.org/models/xception_65_coco_pretrained_2018_10_02.tar.gz" },
        size: None, approx_size: "292MB", sha256: None,
        model: backbone_model("xception65", 1.0, None, 299),
        preprocess: TIMM_XCEPTION,
        license: MODEL_ZOO_LICENSE, metric: None, timm_keys: None,
    },
    WeightSpec {
        name: "xception_71_imagenet",
        aliases: &["xception_71"],
        description: "Official DeepLab Xception-71 ImageNet checkpoint (TensorFlow)",
        kind: WeightKind::Backbone,
        source: Source::Archive { url: "http://download.tensorflow.org/models/xception_71_2018_05_09.tar.gz" },
        size: None, approx_size: "474MB", sha256: None,
        model: backbone_model("xception71", 1.0, None, 299),
        preprocess: TIMM_XCEPTION,
        license: MODEL_ZOO_LICENSE, metric: None, timm_keys: None,
    },
    WeightSpec {
        name: "resnet_v1_50_beta_imagenet",
        aliases: &["resnet_v1_50_beta"],
        description: "Official DeepLab ResNet-50-beta (3x3-conv stem) ImageNet checkpoint (TensorFlow)",
        kind: WeightKind::Backbone,
        source: Source::Archive { url: "http://download.tensorflow.org/models/resnet_v1_50_2018_05_04.tar.gz" },
        size: None, approx_size: "274MB", sha256: None,
        model: backbone_model("resnet50_beta", 1.0, None, 224),
        preprocess: Preprocess { input_size: [224, 224], ..INCEPTION_513 },
        license: MODEL_ZOO_LICENSE, metric: None, timm_keys: None,
    },
    WeightSpec {
        name: "resnet_v1_101_beta_imagenet",
        aliases: &["resnet_v1_101_beta"],
        description: "Official DeepLab ResNet-101-beta (3x3-conv stem) ImageNet checkpoint (TensorFlow)",
        kind: WeightKind::Backbone,
        source: Source::Archive { url: "http://download.tensorflow.org/models/resnet_v1_101_2018_05_04.tar.gz" },
        size: None, approx_size: "477MB", sha256: None,
        model: backbone_model("resnet101_beta", 1.0, None, 224),
        preprocess: Preprocess { input_size: [224, 224], ..INCEPTION_513 },
        license: MODEL_ZOO_LICENSE, metric: None, timm_keys: None,
    },
];
