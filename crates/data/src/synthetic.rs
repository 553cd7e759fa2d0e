//! A procedural scene generator: small segmentation datasets of simple textured shapes, deterministic
//! from a seed, written in the VOC layout or the custom folder layout (for tests, demos and the
//! repository's embedded default dataset).
//!
//! Classes: 0 background (smooth gradient plus a faint texture), 1 disc, 2 square, 3 triangle,
//! 4 stripes (a rectangle of stripes in a random orientation). Each object has a class color with a
//! random tint, every pixel gets uniform noise, and a thin void (255) band runs along every object
//! boundary, as in VOC annotations.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::classes::{voc_color, ClassInfo, ClassTable, VOC_VOID_COLOR};
use crate::error::{DataError, Result};
use crate::io::{save_gray_png, save_jpeg, save_palette_png, save_rgb_png};
use crate::metrics::{boundary_map, chessboard_distance, BoundaryDefinition};
use crate::sample::{LabelMap, RgbImage, Sample, IGNORE_LABEL};

/// Class names of the generated scenes, index = class id.
pub const SYNTHETIC_CLASSES: [&str; 5] = ["background", "disc", "square", "triangle", "stripes"];

/// The class table of the generated scenes (VOC palette colors, void (224, 224, 192) ignored).
pub fn synthetic_classes() -> ClassTable {
    let classes = SYNTHETIC_CLASSES
        .iter()
        .enumerate()
        .map(|(i, n)| ClassInfo::new(*n, voc_color(i as u8)))
        .collect();
    ClassTable::new(classes, vec![ClassInfo::new("void", VOC_VOID_COLOR)])
        .unwrap_or_else(|_| ClassTable::voc())
}

/// Generator settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Seed: the same seed gives byte-identical datasets.
    pub seed: u64,
    /// Training scenes.
    pub num_train: usize,
    /// Validation scenes.
    pub num_val: usize,
    /// Smallest width/height (>= 16).
    pub min_size: u32,
    /// Largest width/height (>= min_size, <= 4096).
    pub max_size: u32,
    /// Objects per scene: 1..=max_objects.
    pub max_objects: usize,
    /// Void band width: pixels within `void_width - 1` (chessboard) of a label change become 255,
    /// on both sides of the edge; 0 disables it.
    pub void_width: u32,
    /// Amplitude of the uniform per-pixel noise (0..=64).
    pub noise: u8,
    /// JPEG quality of the images (1..=100).
    pub jpeg_quality: u8,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            seed: 0,
            num_train: 24,
            num_val: 8,
            min_size: 64,
            max_size: 128,
            max_objects: 3,
            void_width: 1,
            noise: 12,
            jpeg_quality: 92,
        }
    }
}

impl SyntheticConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DataError::Config(format!("synthetic dataset: {m}")));
        if self.min_size < 16 || self.max_size < self.min_size || self.max_size > 4096 {
            return bad(format!(
                "sizes {}..={} must satisfy 16 <= min <= max <= 4096",
                self.min_size, self.max_size
            ));
        }
        if self.max_objects == 0 {
            return bad("max_objects must be at least 1".into());
        }
        if self.num_train + self.num_val == 0 {
            return bad("no scenes requested".into());
        }
        if self.noise > 64 {
            return bad(format!("noise {} is above 64", self.noise));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return bad(format!(
                "JPEG quality {} is outside 1..=100",
                self.jpeg_quality
            ));
        }
        Ok(())
    }
}

/// Which split a scene belongs to (part of its RNG stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticSplit {
    /// Training scenes.
    Train,
    /// Validation scenes.
    Val,
}

impl SyntheticSplit {
    fn tag(self) -> u64 {
        match self {
            SyntheticSplit::Train => 1,
            SyntheticSplit::Val => 2,
        }
    }

    /// `train` or `val`.
    pub fn name(self) -> &'static str {
        match self {
            SyntheticSplit::Train => "train",
            SyntheticSplit::Val => "val",
        }
    }

    /// The id of scene `index`, e.g. `train_0003`.
    pub fn id(self, index: usize) -> String {
        format!("{}_{index:04}", self.name())
    }
}

const BASE_COLORS: [[f32; 3]; 5] = [
    [0.0, 0.0, 0.0], // background: computed per pixel
    [205.0, 70.0, 55.0],
    [60.0, 170.0, 75.0],
    [55.0, 85.0, 205.0],
    [225.0, 200.0, 45.0],
];

enum Shape {
    Disc {
        cx: f32,
        cy: f32,
        r: f32,
    },
    Square {
        x0: f32,
        y0: f32,
        x1: f32,
        y1: f32,
    },
    Triangle {
        p: [(f32, f32); 3],
    },
    Stripes {
        x0: f32,
        y0: f32,
        x1: f32,
        y1: f32,
        angle: f32,
        period: f32,
    },
}

impl Shape {
    fn class(&self) -> u8 {
        match self {
            Shape::Disc { .. } => 1,
            Shape::Square { .. } => 2,
            Shape::Triangle { .. } => 3,
            Shape::Stripes { .. } => 4,
        }
    }

    fn contains(&self, x: f32, y: f32) -> bool {
        match *self {
            Shape::Disc { cx, cy, r } => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
            Shape::Square { x0, y0, x1, y1 } | Shape::Stripes { x0, y0, x1, y1, .. } => {
                x >= x0 && x <= x1 && y >= y0 && y <= y1
            }
            Shape::Triangle { p } => {
                let s = |a: (f32, f32), b: (f32, f32)| {
                    (b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0)
                };
                let (d1, d2, d3) = (s(p[0], p[1]), s(p[1], p[2]), s(p[2], p[0]));
                let neg = d1 < 0.0 || d2 < 0.0 || d3 < 0.0;
                let pos = d1 > 0.0 || d2 > 0.0 || d3 > 0.0;
                !(neg && pos)
            }
        }
    }
}

/// Generates scene `index` of `split`: an image and its label map.
pub fn generate_scene(
    cfg: &SyntheticConfig,
    split: SyntheticSplit,
    index: usize,
) -> Result<Sample> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream((split.tag() << 40) | index as u64);
    let w = rng.gen_range(cfg.min_size..=cfg.max_size);
    let h = rng.gen_range(cfg.min_size..=cfg.max_size);
    let (wf, hf) = (w as f32, h as f32);
    let m = wf.min(hf);

    // background: gradient between two random muted colors plus a faint sinusoidal texture
    let bg_a: [f32; 3] = std::array::from_fn(|_| rng.gen_range(70.0..150.0));
    let bg_b: [f32; 3] = std::array::from_fn(|_| rng.gen_range(70.0..150.0));
    let (gx, gy) = (rng.gen_range(-1.0f32..1.0), rng.gen_range(-1.0f32..1.0));
    let tex_freq = rng.gen_range(0.15f32..0.5);

    let n_obj = rng.gen_range(1..=cfg.max_objects);
    let mut shapes = Vec::with_capacity(n_obj);
    let mut tints = Vec::with_capacity(n_obj);
    for _ in 0..n_obj {
        let class = rng.gen_range(1..=4u8);
        let cx = rng.gen_range(0.15 * wf..0.85 * wf);
        let cy = rng.gen_range(0.15 * hf..0.85 * hf);
        let r = rng.gen_range(0.12 * m..0.28 * m);
        let shape = match class {
            1 => Shape::Disc { cx, cy, r },
            2 => Shape::Square {
                x0: cx - r,
                y0: cy - r,
                x1: cx + r,
                y1: cy + r,
            },
            3 => {
                let rot = rng.gen_range(0.0..std::f32::consts::TAU);
                let p = std::array::from_fn(|k| {
                    let a = rot + k as f32 * std::f32::consts::TAU / 3.0;
                    (cx + 1.3 * r * a.cos(), cy + 1.3 * r * a.sin())
                });
                Shape::Triangle { p }
            }
            _ => Shape::Stripes {
                x0: cx - 1.2 * r,
                y0: cy - 0.8 * r,
                x1: cx + 1.2 * r,
                y1: cy + 0.8 * r,
                angle: rng.gen_range(0.0..std::f32::consts::PI),
                period: rng.gen_range(4.0f32..9.0),
            },
        };
        let tint: [f32; 3] = std::array::from_fn(|_| rng.gen_range(-20.0..20.0));
        shapes.push(shape);
        tints.push(tint);
    }

    let mut label = LabelMap::filled(w, h, 0);
    let mut owner = vec![usize::MAX; (w * h) as usize];
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            for (k, s) in shapes.iter().enumerate() {
                if s.contains(px, py) {
                    owner[(y * w + x) as usize] = k;
                }
            }
            if let Some(s) = shapes.get(owner[(y * w + x) as usize]) {
                label.set(x, y, s.class());
            }
        }
    }

    let noise = cfg.noise as f32;
    let mut image = RgbImage::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let k = owner[(y * w + x) as usize];
            let base: [f32; 3] = match shapes.get(k) {
                None => {
                    let t =
                        (0.5 + 0.5 * (gx * (px / wf - 0.5) + gy * (py / hf - 0.5))).clamp(0.0, 1.0);
                    let tex = 8.0 * (tex_freq * px).sin() * (tex_freq * 1.3 * py).cos();
                    std::array::from_fn(|c| bg_a[c] + (bg_b[c] - bg_a[c]) * t + tex)
                }
                Some(Shape::Stripes { angle, period, .. }) => {
                    let u = px * angle.cos() + py * angle.sin();
                    let on = (u / period).rem_euclid(2.0) < 1.0;
                    let c = BASE_COLORS[4];
                    std::array::from_fn(|i| if on { c[i] + tints[k][i] } else { 0.3 * c[i] })
                }
                Some(s) => {
                    let c = BASE_COLORS[s.class() as usize];
                    std::array::from_fn(|i| c[i] + tints[k][i])
                }
            };
            let px_val: [u8; 3] = std::array::from_fn(|c| {
                let n = if noise > 0.0 {
                    rng.gen_range(-noise..=noise)
                } else {
                    0.0
                };
                (base[c] + n).round().clamp(0.0, 255.0) as u8
            });
            image.put_pixel(x, y, image::Rgb(px_val));
        }
    }

    if cfg.void_width > 0 {
        let (wu, hu) = (w as usize, h as usize);
        let b = boundary_map(label.as_slice(), wu, hu, BoundaryDefinition::LabelChange)?;
        let d = chessboard_distance(&b, wu, hu);
        for (v, dist) in label.as_mut_slice().iter_mut().zip(d) {
            if dist < cfg.void_width {
                *v = IGNORE_LABEL;
            }
        }
    }

    Ok(Sample {
        id: split.id(index),
        image,
        label,
    })
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticDataset {
    /// The dataset root.
    pub root: PathBuf,
    /// Training ids.
    pub train: Vec<String>,
    /// Validation ids.
    pub val: Vec<String>,
}

/// How masks are stored in the folder layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderMaskStyle {
    /// Grayscale PNGs of class ids (255 = void).
    Index,
    /// RGB PNGs in the class colors (void in the ignore color (224, 224, 192)).
    Color,
}

fn prepare_root(root: &Path) -> Result<()> {
    if root.exists() {
        let mut rd = std::fs::read_dir(root).map_err(|e| DataError::io(root, e))?;
        if rd.next().is_some() {
            return Err(DataError::Config(format!(
                "refusing to write a synthetic dataset into {}: the directory is not empty",
                root.display()
            )));
        }
    }
    Ok(())
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| DataError::io(p, e))
}

fn write_list(path: &Path, ids: &[String]) -> Result<()> {
    let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
    crate::io::write_atomic(path, |w| {
        w.write_all(text.as_bytes()).map_err(|e| e.to_string())
    })
}

fn scenes(cfg: &SyntheticConfig) -> impl Iterator<Item = (SyntheticSplit, usize)> + '_ {
    (0..cfg.num_train)
        .map(|i| (SyntheticSplit::Train, i))
        .chain((0..cfg.num_val).map(|i| (SyntheticSplit::Val, i)))
}

/// Writes the dataset in the VOC layout under `root` (which must be absent or empty):
/// `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette PNGs), a `classes.txt` with the five
/// classes, and `ImageSets/Segmentation/{train,val,trainval}.txt`.
pub fn write_voc(root: impl AsRef<Path>, cfg: &SyntheticConfig) -> Result<SyntheticDataset> {
    let root = root.as_ref();
    cfg.validate()?;
    prepare_root(root)?;
    let (img_dir, mask_dir, sets) = (
        root.join("JPEGImages"),
        root.join("SegmentationClass"),
        root.join("ImageSets").join("Segmentation"),
    );
    for d in [&img_dir, &mask_dir, &sets] {
        mkdir(d)?;
    }
    let classes = synthetic_classes();
    let palette = classes.palette();
    let mut out = SyntheticDataset {
        root: root.to_path_buf(),
        train: Vec::new(),
        val: Vec::new(),
    };
    for (split, i) in scenes(cfg) {
        let s = generate_scene(cfg, split, i)?;
        save_jpeg(
            img_dir.join(format!("{}.jpg", s.id)),
            &s.image,
            cfg.jpeg_quality,
        )?;
        save_palette_png(
            mask_dir.join(format!("{}.png", s.id)),
            &s.label,
            palette.colors(),
        )?;
        match split {
            SyntheticSplit::Train => out.train.push(s.id),
            SyntheticSplit::Val => out.val.push(s.id),
        }
    }
    let class_text = classes.to_file_string();
    crate::io::write_atomic(root.join("classes.txt"), |w| {
        w.write_all(class_text.as_bytes())
            .map_err(|e| e.to_string())
    })?;
    write_list(&sets.join("train.txt"), &out.train)?;
    write_list(&sets.join("val.txt"), &out.val)?;
    let all: Vec<String> = out.train.iter().chain(&out.val).cloned().collect();
    write_list(&sets.join("trainval.txt"), &all)?;
    Ok(out)
}

/// Writes the dataset in the custom folder layout under `root` (absent or empty): `classes.txt`,
/// `images/<id>.jpg`, `masks/<id>.png` in `style`, `splits/{train,val}.txt`.
pub fn write_folder(
    root: impl AsRef<Path>,
    cfg: &SyntheticConfig,
    style: FolderMaskStyle,
) -> Result<SyntheticDataset> {
    let root = root.as_ref();
    cfg.validate()?;
    prepare_root(root)?;
    let (img_dir, mask_dir, split_dir) =
        (root.join("images"), root.join("masks"), root.join("splits"));
    for d in [&img_dir, &mask_dir, &split_dir] {
        mkdir(d)?;
    }
    let classes = synthetic_classes();
    let palette = classes.palette();
    let mut out = SyntheticDataset {
        root: root.to_path_buf(),
        train: Vec::new(),
        val: Vec::new(),
    };
    for (split, i) in scenes(cfg) {
        let s = generate_scene(cfg, split, i)?;
        save_jpeg(
            img_dir.join(format!("{}.jpg", s.id)),
            &s.image,
            cfg.jpeg_quality,
        )?;
        let mask_path = mask_dir.join(format!("{}.png", s.id));
        match style {
            FolderMaskStyle::Index => save_gray_png(&mask_path, &s.label)?,
            FolderMaskStyle::Color => {
                save_rgb_png(&mask_path, &crate::render::colorize(&s.label, &palette))?
            }
        }
        match split {
            SyntheticSplit::Train => out.train.push(s.id),
            SyntheticSplit::Val => out.val.push(s.id),
        }
    }
    let class_text = classes.to_file_string();
    crate::io::write_atomic(root.join("classes.txt"), |w| {
        w.write_all(class_text.as_bytes())
            .map_err(|e| e.to_string())
    })?;
    write_list(&split_dir.join("train.txt"), &out.train)?;
    write_list(&split_dir.join("val.txt"), &out.val)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_valid() {
        let cfg = SyntheticConfig::default();
        let a = generate_scene(&cfg, SyntheticSplit::Train, 3).unwrap();
        let b = generate_scene(&cfg, SyntheticSplit::Train, 3).unwrap();
        assert_eq!(a.image, b.image);
        assert_eq!(a.label, b.label);
        let c = generate_scene(&cfg, SyntheticSplit::Val, 3).unwrap();
        assert_ne!(a.image, c.image);
        let other_seed = SyntheticConfig {
            seed: 1,
            ..cfg.clone()
        };
        assert_ne!(
            generate_scene(&other_seed, SyntheticSplit::Train, 3)
                .unwrap()
                .image,
            a.image
        );
        for i in 0..10 {
            let s = generate_scene(&cfg, SyntheticSplit::Train, i).unwrap();
            let (w, h) = s.image.dimensions();
            assert!((64..=128).contains(&w) && (64..=128).contains(&h));
            assert_eq!(s.label.dimensions(), (w, h));
            let u = s.label.unique_values();
            assert!(u.iter().all(|&v| v <= 4 || v == 255), "{u:?}");
            assert!(u.contains(&0) && u.contains(&255) && u.len() >= 3, "{u:?}");
        }
    }

    #[test]
    fn void_band_separates_classes() {
        let cfg = SyntheticConfig::default();
        let s = generate_scene(&cfg, SyntheticSplit::Train, 0).unwrap();
        let (w, h) = (s.label.width() as usize, s.label.height() as usize);
        let l = s.label.as_slice();
        // no two different non-void classes touch
        for y in 0..h {
            for x in 0..w {
                let v = l[y * w + x];
                if v == 255 {
                    continue;
                }
                if x + 1 < w {
                    let r = l[y * w + x + 1];
                    assert!(r == v || r == 255);
                }
                if y + 1 < h {
                    let d = l[(y + 1) * w + x];
                    assert!(d == v || d == 255);
                }
            }
        }
    }

    #[test]
    fn refuses_non_empty_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.txt"), b"user data").unwrap();
        let err = write_voc(dir.path(), &SyntheticConfig::default()).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("mine.txt")).unwrap(),
            b"user data"
        );
    }
}
