//! The text of `cargo xtask fetch-weights --list`.
use std::fmt::Write as _;

use deeplab_weights::cache::CacheLayout;
use deeplab_weights::{ModelSpec, WeightSpec};

fn model_line(m: &ModelSpec) -> String {
    let mut s = format!("{} (width {:.2})", m.backbone, m.width_multiplier);
    match &m.head {
        Some(h) => {
            let os = m.eval_output_stride;
            match h.atrous_rates_at(os) {
                Some(r) => {
                    let _ = write!(s, ", ASPP rates {}/{}/{} at OS{os}", r[0], r[1], r[2]);
                }
                None => {
                    let _ = write!(s, ", ASPP 1x1 only at OS{os}");
                }
            }
            if h.image_pooling {
                s.push_str(" + image pooling");
            }
            match h.decoder_output_stride {
                Some(d) => {
                    let _ = write!(s, ", decoder at OS{d}");
                }
                None => s.push_str(", no decoder"),
            }
            if h.separable && (h.atrous_rates_os16.is_some() || h.decoder_output_stride.is_some()) {
                s.push_str(", separable");
            }
        }
        None => {
            let _ = write!(s, ", classifier backbone (OS{})", m.eval_output_stride);
        }
    }
    if let Some(train) = m.train_output_stride {
        if m.head.is_some() {
            let _ = write!(s, ", trained at OS{train}");
        }
    }
    if let Some(c) = m.num_classes {
        let _ = write!(s, ", {c} classes");
    }
    let _ = write!(s, ", crop {}x{}", m.crop_size[0], m.crop_size[1]);
    s
}

/// Render the table. With `cache`, a column says whether each entry is already fetched (checked on
/// the local disk only). With `verbose`, each entry also shows its model, preprocessing and metric.
pub fn render(specs: &[WeightSpec], cache: Option<&CacheLayout>, verbose: bool) -> String {
    let name_w = specs.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<name_w$}  {:<12}  {:>7}  {:<12}  {:<6}  PUBLISHED METRIC",
        "NAME", "KIND", "SIZE", "LICENSE", "CACHED"
    );
    for s in specs {
        let cached = match cache {
            Some(c) => {
                if c.locate(s).is_some() {
                    "yes"
                } else {
                    "no"
                }
            }
            None => "?",
        };
        let metric = s
            .metric
            .map(|m| format!("{:.2}% {} {}", m.value, m.name, m.dataset))
            .unwrap_or_else(|| "-".to_string());
        let _ = writeln!(
            out,
            "{:<name_w$}  {:<12}  {:>7}  {:<12}  {:<6}  {metric}",
            s.name,
            s.kind.to_string(),
            s.approx_size,
            s.license,
            cached
        );
        let _ = writeln!(out, "{:<name_w$}    from {}", "", s.source);
        if verbose {
            let _ = writeln!(out, "{:<name_w$}    {}", "", s.description);
            let _ = writeln!(out, "{:<name_w$}    model: {}", "", model_line(&s.model));
            let p = &s.preprocess;
            let _ = writeln!(
                out,
                "{:<name_w$}    input: {}x{}, {}",
                "", p.input_size[0], p.input_size[1], p.normalization
            );
            if let Some(m) = s.metric {
                let _ = writeln!(
                    out,
                    "{:<name_w$}    metric: {} ({})",
                    "", m.protocol, m.reference
                );
            }
            let _ = writeln!(
                out,
                "{:<name_w$}    sha256: {}{}",
                "",
                s.sha256.unwrap_or(match s.source {
                    deeplab_weights::Source::Hub { .. } => {
                        "not in the table (checked against the hub's LFS sha256)"
                    }
                    deeplab_weights::Source::Archive { .. } => {
                        "not published (printed and recorded on first download)"
                    }
                }),
                s.timm_keys
                    .map(|k| format!("; keys: timm {k}"))
                    .unwrap_or_default()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use deeplab_weights::{all, find};

    #[test]
    fn every_entry_is_listed_with_its_source_and_license() {
        let text = render(all(), None, false);
        for s in all() {
            assert!(text.contains(s.name), "{}", s.name);
            assert!(text.contains(&s.source.to_string()), "{}", s.name);
        }
        assert!(text.contains("bsd-3-clause") && text.contains("apache-2.0"));
        assert!(text.contains("82.20% mIoU PASCAL VOC 2012 val"));
    }

    #[test]
    fn verbose_describes_the_model() {
        let spec = find("xception65_coco_voc_trainval").unwrap();
        let text = render(std::slice::from_ref(spec), None, true);
        assert!(
            text.contains("ASPP rates 12/24/36 at OS8 + image pooling, decoder at OS4, separable"),
            "{text}"
        );
        assert!(text.contains("21 classes, crop 513x513"), "{text}");
        assert!(text.contains("inception (x*2/255-1)"), "{text}");
        let mobile = find("mobilenetv2_coco_voc_trainaug").unwrap();
        let text = render(std::slice::from_ref(mobile), None, true);
        assert!(
            text.contains("ASPP 1x1 only at OS16 + image pooling, no decoder, trained at OS16"),
            "{text}"
        );
    }
}
