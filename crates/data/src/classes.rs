//! Class tables (names and colors), the classes-file format of custom datasets, and color palettes.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{DataError, Result};
use crate::sample::IGNORE_LABEL;

/// The 21 PASCAL VOC 2012 class names, index = class id.
pub const VOC_CLASSES: [&str; 21] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// The color of VOC's void label (255) in the VOC palette.
pub const VOC_VOID_COLOR: [u8; 3] = [224, 224, 192];

/// The color of entry `index` of the standard PASCAL VOC palette (the one stored in
/// `SegmentationClass/*.png`): the bits of the index are spread over the high bits of R, G and B.
pub fn voc_color(index: u8) -> [u8; 3] {
    let mut rgb = [0u8; 3];
    let mut c = index;
    for j in 0..8 {
        for (k, channel) in rgb.iter_mut().enumerate() {
            *channel |= ((c >> k) & 1) << (7 - j);
        }
        c >>= 3;
    }
    rgb
}

/// One class: its name and the color it is drawn with (and matched by in color masks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassInfo {
    /// Class name.
    pub name: String,
    /// RGB color.
    pub color: [u8; 3],
}

impl ClassInfo {
    /// A class from a name and a color.
    pub fn new(name: impl Into<String>, color: [u8; 3]) -> Self {
        ClassInfo {
            name: name.into(),
            color,
        }
    }
}

/// The classes of a dataset (ids `0..len()`, in order) plus colors that mean "ignore" (label 255).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassTable {
    classes: Vec<ClassInfo>,
    ignore: Vec<ClassInfo>,
}

impl ClassTable {
    /// Builds a table; fails when there are no classes, more than 255, or duplicate names or colors.
    pub fn new(classes: Vec<ClassInfo>, ignore: Vec<ClassInfo>) -> Result<Self> {
        if classes.is_empty() {
            return Err(DataError::Config(
                "a class table needs at least one class".into(),
            ));
        }
        if classes.len() > 255 {
            return Err(DataError::Config(format!(
                "{} classes: at most 255 are supported (255 is the ignore label)",
                classes.len()
            )));
        }
        let mut names = HashMap::new();
        let mut colors = HashMap::new();
        for c in classes.iter().chain(&ignore) {
            if names.insert(c.name.clone(), ()).is_some() {
                return Err(DataError::Config(format!(
                    "duplicate class name '{}'",
                    c.name
                )));
            }
            if let Some(other) = colors.insert(c.color, c.name.clone()) {
                return Err(DataError::Config(format!(
                    "classes '{other}' and '{}' share the color {:?}",
                    c.name, c.color
                )));
            }
        }
        Ok(ClassTable { classes, ignore })
    }

    /// The 21 PASCAL VOC classes with the VOC palette colors; void (224,224,192) is ignored.
    pub fn voc() -> Self {
        ClassTable {
            classes: VOC_CLASSES
                .iter()
                .enumerate()
                .map(|(i, n)| ClassInfo::new(*n, voc_color(i as u8)))
                .collect(),
            ignore: vec![ClassInfo::new("void", VOC_VOID_COLOR)],
        }
    }

    /// The 19 Cityscapes train classes with their official colors.
    pub fn cityscapes() -> Self {
        let classes = crate::cityscapes::train_classes()
            .map(|l| ClassInfo::new(l.name, l.color))
            .collect();
        ClassTable {
            classes,
            ignore: Vec::new(),
        }
    }

    /// Number of classes (the ignore label not included).
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Always false: a table has at least one class.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// The classes, index = class id.
    pub fn classes(&self) -> &[ClassInfo] {
        &self.classes
    }

    /// Colors mapped to the ignore label in color masks.
    pub fn ignore_classes(&self) -> &[ClassInfo] {
        &self.ignore
    }

    /// Class names, index = class id.
    pub fn names(&self) -> Vec<&str> {
        self.classes.iter().map(|c| c.name.as_str()).collect()
    }

    /// The label a color stands for in a color mask: a class id, `IGNORE_LABEL` for an ignore color,
    /// `None` for an unknown color.
    pub fn label_of_color(&self, color: [u8; 3]) -> Option<u8> {
        if let Some(i) = self.classes.iter().position(|c| c.color == color) {
            return Some(i as u8);
        }
        self.ignore
            .iter()
            .any(|c| c.color == color)
            .then_some(IGNORE_LABEL)
    }

    /// A 256-entry palette: class colors at their ids, the first ignore color (or VOC's void color)
    /// at 255, VOC palette colors elsewhere.
    pub fn palette(&self) -> Palette {
        let mut colors: Vec<[u8; 3]> = (0..=255u8).map(voc_color).collect();
        for (i, c) in self.classes.iter().enumerate() {
            colors[i] = c.color;
        }
        colors[IGNORE_LABEL as usize] = self.ignore.first().map_or(VOC_VOID_COLOR, |c| c.color);
        Palette { colors }
    }

    /// Reads a classes file (see [`ClassTable::parse`] for the format).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(DataError::MissingPath {
                what: "classes file",
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses the classes-file format; `path` is used in error messages.
    ///
    /// One class per line, in class-id order: `name, R, G, B` or `name, #RRGGBB`, optionally followed
    /// by `, ignore` to declare a color that means "ignore this pixel" (label 255; ignore lines take no
    /// class id). Blank lines and lines starting with `#` are skipped, as is a first line that is a CSV
    /// header starting with `name,`.
    ///
    /// ```text
    /// # name, color [, ignore]
    /// background, 0, 0, 0
    /// crack, #ff0000
    /// unlabeled, 255, 255, 255, ignore
    /// ```
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let err = |line: usize, message: String| DataError::ClassesFile {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut classes = Vec::new();
        let mut ignore = Vec::new();
        let mut first_content_line = true;
        for (i, raw) in text.lines().enumerate() {
            let lineno = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if first_content_line && fields[0].eq_ignore_ascii_case("name") {
                first_content_line = false;
                continue;
            }
            first_content_line = false;
            let name = fields[0];
            if name.is_empty() {
                return Err(err(lineno, "empty class name".into()));
            }
            let (color, rest) = if fields.len() >= 2 && fields[1].starts_with('#') {
                (
                    parse_hex(fields[1]).map_err(|m| err(lineno, m))?,
                    &fields[2..],
                )
            } else if fields.len() >= 4 {
                let mut c = [0u8; 3];
                for (k, f) in fields[1..4].iter().enumerate() {
                    c[k] = f.parse::<u8>().map_err(|_| {
                        err(
                            lineno,
                            format!("color component '{f}' of class '{name}' is not an integer in 0..=255"),
                        )
                    })?;
                }
                (c, &fields[4..])
            } else {
                return Err(err(
                    lineno,
                    format!("expected 'name, R, G, B' or 'name, #RRGGBB' (optionally ', ignore'), got '{line}'"),
                ));
            };
            match rest {
                [] => classes.push(ClassInfo::new(name, color)),
                [flag] if flag.eq_ignore_ascii_case("ignore") => {
                    ignore.push(ClassInfo::new(name, color))
                }
                _ => {
                    return Err(err(
                        lineno,
                        format!(
                        "unexpected trailing fields {rest:?}: only ', ignore' may follow the color"
                    ),
                    ))
                }
            }
        }
        Self::new(classes, ignore).map_err(|e| match e {
            DataError::Config(m) => err(0, m),
            other => other,
        })
    }

    /// The table in the classes-file format ([`ClassTable::parse`] reads it back).
    pub fn to_file_string(&self) -> String {
        let mut s = String::from("# name, R, G, B [, ignore]\n");
        for c in &self.classes {
            s += &format!(
                "{}, {}, {}, {}\n",
                c.name, c.color[0], c.color[1], c.color[2]
            );
        }
        for c in &self.ignore {
            s += &format!(
                "{}, {}, {}, {}, ignore\n",
                c.name, c.color[0], c.color[1], c.color[2]
            );
        }
        s
    }
}

fn parse_hex(s: &str) -> std::result::Result<[u8; 3], String> {
    let h = &s[1..];
    if h.len() != 6 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("'{s}' is not a #RRGGBB color"));
    }
    let byte = |i: usize| u8::from_str_radix(&h[i..i + 2], 16).map_err(|e| e.to_string());
    Ok([byte(0)?, byte(2)?, byte(4)?])
}

/// A color for each of the 256 label values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Palette {
    colors: Vec<[u8; 3]>,
}

impl Palette {
    /// The standard PASCAL VOC palette (255 = void, (224, 224, 192)).
    pub fn voc() -> Self {
        Palette {
            colors: (0..=255u8).map(voc_color).collect(),
        }
    }

    /// The Cityscapes train-id colors (0..19); every other value, including 255, is black.
    pub fn cityscapes() -> Self {
        let mut colors = vec![[0u8; 3]; 256];
        for (i, l) in crate::cityscapes::train_classes().enumerate() {
            colors[i] = l.color;
        }
        Palette { colors }
    }

    /// A palette from up to 256 colors; missing entries are black.
    pub fn from_colors(colors: &[[u8; 3]]) -> Result<Self> {
        if colors.len() > 256 {
            return Err(DataError::Config(format!(
                "a palette holds at most 256 colors, got {}",
                colors.len()
            )));
        }
        let mut c = colors.to_vec();
        c.resize(256, [0, 0, 0]);
        Ok(Palette { colors: c })
    }

    /// The color of label `value`.
    pub fn color(&self, value: u8) -> [u8; 3] {
        self.colors[value as usize]
    }

    /// All 256 colors, index = label value.
    pub fn colors(&self) -> &[[u8; 3]] {
        &self.colors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_palette_known_entries() {
        assert_eq!(voc_color(0), [0, 0, 0]);
        assert_eq!(voc_color(1), [128, 0, 0]);
        assert_eq!(voc_color(2), [0, 128, 0]);
        assert_eq!(voc_color(15), [192, 128, 128]); // person
        assert_eq!(voc_color(20), [0, 64, 128]); // tvmonitor
        assert_eq!(voc_color(255), VOC_VOID_COLOR);
    }

    #[test]
    fn classes_file_roundtrip_and_colors() {
        let text = "name,r,g,b\n# comment\nbackground, 0, 0, 0\ncrack, #FF0000\n\nvoid, 255,255,255, ignore\n";
        let t = ClassTable::parse(text, Path::new("classes.txt")).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.names(), vec!["background", "crack"]);
        assert_eq!(t.label_of_color([255, 0, 0]), Some(1));
        assert_eq!(t.label_of_color([255, 255, 255]), Some(255));
        assert_eq!(t.label_of_color([1, 2, 3]), None);
        let again = ClassTable::parse(&t.to_file_string(), Path::new("x")).unwrap();
        assert_eq!(again, t);
        assert_eq!(t.palette().color(255), [255, 255, 255]);
    }

    #[test]
    fn classes_file_errors_name_file_and_line() {
        let p = Path::new("my/classes.txt");
        let e = ClassTable::parse("a, 1, 2\n", p).unwrap_err();
        assert!(e.to_string().starts_with("my/classes.txt:1:"), "{e}");
        let e = ClassTable::parse("a, 1, 2, 300\n", p).unwrap_err();
        assert!(e.to_string().contains("'300'"), "{e}");
        let e = ClassTable::parse("a, #12345\n", p).unwrap_err();
        assert!(e.to_string().contains("#12345"), "{e}");
        let e = ClassTable::parse("a, 1,2,3\nb, 1,2,3\n", p).unwrap_err();
        assert!(e.to_string().contains("share the color"), "{e}");
        let e = ClassTable::parse("# nothing\n", p).unwrap_err();
        assert!(e.to_string().contains("at least one class"), "{e}");
        let e = ClassTable::parse("a, 1,2,3, maybe\n", p).unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
    }
}
