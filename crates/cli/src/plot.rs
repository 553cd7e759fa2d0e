//! A small line-chart renderer for training curves (loss, learning rate, mIoU), drawn directly
//! into an RGB image with a built-in 5x7 bitmap font, so no font files or plotting backends
//! are needed.

use deeplab_data::RgbImage;
use image::Rgb;

/// One line of a panel.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Line color.
    pub color: [u8; 3],
    /// `(x, y)` points in x order.
    pub points: Vec<(f64, f64)>,
    /// Draw a square marker at every point (for sparse series such as validation).
    pub markers: bool,
}

/// One chart: a title and its series, sharing axes.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Title drawn at the top-left.
    pub title: String,
    /// The lines.
    pub series: Vec<Series>,
}

const PANEL_H: u32 = 230;
const MARGIN_L: u32 = 70;
const MARGIN_R: u32 = 20;
const MARGIN_T: u32 = 28;
const MARGIN_B: u32 = 30;

/// Renders the panels stacked vertically into a `width`-pixel-wide image.
pub fn render(panels: &[Panel], width: u32) -> RgbImage {
    let width = width.max(MARGIN_L + MARGIN_R + 50);
    let height = PANEL_H * panels.len().max(1) as u32;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (i, p) in panels.iter().enumerate() {
        draw_panel(&mut img, p, i as u32 * PANEL_H, width);
    }
    img
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn draw_panel(img: &mut RgbImage, p: &Panel, top: u32, width: u32) {
    let (x0, x1) = (MARGIN_L, width - MARGIN_R);
    let (y0, y1) = (top + MARGIN_T, top + PANEL_H - MARGIN_B);
    draw_text(img, 8, top + 8, &p.title, [0, 0, 0]);
    let pts: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    // axes box
    for x in x0..=x1 {
        put(img, x as i64, y0 as i64, [160, 160, 160]);
        put(img, x as i64, y1 as i64, [0, 0, 0]);
    }
    for y in y0..=y1 {
        put(img, x0 as i64, y as i64, [0, 0, 0]);
        put(img, x1 as i64, y as i64, [160, 160, 160]);
    }
    if pts.is_empty() {
        draw_text(img, x0 + 10, (y0 + y1) / 2, "no data yet", [120, 120, 120]);
        return;
    }
    let (mut xmin, mut xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    let (mut ymin, mut ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
        (a.min(*y), b.max(*y))
    });
    if xmax <= xmin {
        xmin -= 1.0;
        xmax += 1.0;
    }
    if ymax <= ymin {
        let d = if ymin == 0.0 { 1.0 } else { ymin.abs() * 0.1 };
        ymin -= d;
        ymax += d;
    }
    let pad = (ymax - ymin) * 0.05;
    ymin -= pad;
    ymax += pad;
    let sx = |x: f64| x0 as f64 + (x - xmin) / (xmax - xmin) * (x1 - x0) as f64;
    let sy = |y: f64| y1 as f64 - (y - ymin) / (ymax - ymin) * (y1 - y0) as f64;
    // grid and tick labels
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let yv = ymin + f * (ymax - ymin);
        let py = sy(yv).round() as i64;
        for x in (x0 + 1..x1).step_by(4) {
            put(img, x as i64, py, [215, 215, 215]);
        }
        let label = fmt_num(yv);
        let tw = text_width(&label);
        draw_text(
            img,
            x0.saturating_sub(tw + 4),
            (py - 3).max(0) as u32,
            &label,
            [60, 60, 60],
        );
        let xv = xmin + f * (xmax - xmin);
        let px = sx(xv).round() as i64;
        for y in (y0 + 1..y1).step_by(4) {
            put(img, px, y as i64, [215, 215, 215]);
        }
        let label = if xmax - xmin >= 4.0 {
            format!("{xv:.0}")
        } else {
            fmt_num(xv)
        };
        let tw = text_width(&label) as i64;
        draw_text(
            img,
            (px - tw / 2).max(0) as u32,
            y1 + 6,
            &label,
            [60, 60, 60],
        );
    }
    draw_text(img, x1 - text_width("step"), y1 + 18, "step", [60, 60, 60]);
    // series and legend
    let mut lx = x0 + 8 + text_width(&p.title);
    lx = lx.max(200);
    for s in &p.series {
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in &s.points {
            if !(x.is_finite() && y.is_finite()) {
                prev = None;
                continue;
            }
            let q = (sx(x), sy(y));
            if let Some(pr) = prev {
                line(img, pr, q, s.color);
            }
            if s.markers || s.points.len() == 1 {
                for dy in -2..=2 {
                    for dx in -2..=2 {
                        put(
                            img,
                            q.0.round() as i64 + dx,
                            q.1.round() as i64 + dy,
                            s.color,
                        );
                    }
                }
            }
            prev = Some(q);
        }
        for dx in 0..14 {
            for dy in 0..3 {
                put(img, (lx + dx) as i64, (top + 11 + dy) as i64, s.color);
            }
        }
        draw_text(img, lx + 18, top + 8, &s.name, [0, 0, 0]);
        lx += 18 + text_width(&s.name) + 20;
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

/// A 2-pixel-wide line.
fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: [u8; 3]) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let x = (a.0 + t * (b.0 - a.0)).round() as i64;
        let y = (a.1 + t * (b.1 - a.1)).round() as i64;
        put(img, x, y, c);
        put(img, x, y + 1, c);
    }
}

/// Width in pixels of `text` in the built-in font.
pub fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * 6
}

/// Draws `text` with its top-left corner at `(x, y)`; characters without a glyph are drawn
/// as a box.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, color: [u8; 3]) {
    for (i, ch) in text.chars().enumerate() {
        let rows = glyph(ch);
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    put(
                        img,
                        (x + i as u32 * 6 + col) as i64,
                        (y + r as u32) as i64,
                        color,
                    );
                }
            }
        }
    }
}

#[rustfmt::skip]
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110],
        '1' => [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        '2' => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111],
        '3' => [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110],
        '4' => [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010],
        '5' => [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110],
        '6' => [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110],
        '7' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000],
        '8' => [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110],
        '9' => [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100],
        '.' => [0, 0, 0, 0, 0, 0b01100, 0b01100],
        ',' => [0, 0, 0, 0, 0b01100, 0b00100, 0b01000],
        '-' => [0, 0, 0, 0b11111, 0, 0, 0],
        '+' => [0, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0],
        ':' => [0, 0b01100, 0b01100, 0, 0b01100, 0b01100, 0],
        '%' => [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011],
        '/' => [0, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0],
        '(' => [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010],
        ')' => [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000],
        '=' => [0, 0, 0b11111, 0, 0b11111, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0b11111],
        ' ' => [0; 7],
        'a' => [0, 0, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111],
        'b' => [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110],
        'c' => [0, 0, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110],
        'd' => [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111],
        'e' => [0, 0, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110],
        'f' => [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000],
        'g' => [0, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110],
        'h' => [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001],
        'i' => [0b00100, 0, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110],
        'j' => [0b00010, 0, 0b00110, 0b00010, 0b00010, 0b10010, 0b01100],
        'k' => [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010],
        'l' => [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        'm' => [0, 0, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001],
        'n' => [0, 0, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001],
        'o' => [0, 0, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110],
        'p' => [0, 0, 0b11110, 0b10001, 0b11110, 0b10000, 0b10000],
        'q' => [0, 0, 0b01101, 0b10011, 0b01111, 0b00001, 0b00001],
        'r' => [0, 0, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000],
        's' => [0, 0, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110],
        't' => [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110],
        'u' => [0, 0, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101],
        'v' => [0, 0, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        'w' => [0, 0, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010],
        'x' => [0, 0, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001],
        'y' => [0, 0, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110],
        'z' => [0, 0, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111],
        _ => [0b11111, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b11111],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_lines_and_text() {
        let panel = Panel {
            title: "loss".into(),
            series: vec![Series {
                name: "train".into(),
                color: [255, 0, 0],
                points: (0..50)
                    .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                    .collect(),
                markers: false,
            }],
        };
        let empty = Panel {
            title: "miou".into(),
            series: vec![],
        };
        let img = render(&[panel, empty], 400);
        assert_eq!(img.dimensions(), (400, 2 * PANEL_H));
        let red = img.pixels().filter(|p| p.0 == [255, 0, 0]).count();
        assert!(red > 200, "{red} red pixels");
        let black = img.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(black > 100);
        assert_eq!(fmt_num(0.007), "0.0070");
        assert_eq!(fmt_num(1234.0), "1234");
        assert_eq!(fmt_num(2e-5), "2.00e-5");
    }
}
