//! Prints a TFLite model's graph: inputs/outputs, a count per op type and the operator listing.
//!
//! `cargo run -p deeplab-formats --example tflite_dump -- MODEL.tflite [--head N] [--tail N] [--tensors] [--short-names]`
//! (without `--head`/`--tail` every operator is listed; `--short-names` cuts the fused tensor
//! names of quantized models, `a;b;c`, to their first part).

use std::process::ExitCode;

use deeplab_formats::tflite::TfliteModel;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!(
            "usage: tflite_dump MODEL.tflite [--head N] [--tail N] [--tensors] [--short-names]"
        );
        return ExitCode::from(2);
    };
    let number = |flag: &str| -> Option<usize> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    let (head, tail) = (number("--head"), number("--tail"));
    let short = args.iter().any(|a| a == "--short-names");
    let model = match TfliteModel::open(path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let g = model.main_subgraph();
    println!(
        "{path}: schema v{}, {} subgraph(s), {} buffers, {} tensors, {} operators",
        model.version,
        model.subgraphs.len(),
        model.num_buffers(),
        g.tensors.len(),
        g.operators.len()
    );
    for (what, list) in [("input", &g.inputs), ("output", &g.outputs)] {
        for &i in list {
            let t = &g.tensors[i];
            println!(
                "{what}: t{} '{}' {:?} {} {:?}",
                i,
                t.name,
                t.shape,
                t.dtype,
                t.quantization.as_ref().map(|q| (&q.scale, &q.zero_point))
            );
        }
    }
    println!("op counts:");
    for (op, n) in g.op_counts() {
        println!("  {op:<24} {n}");
    }
    let n = g.operators.len();
    let shown: Vec<usize> = match (head, tail) {
        (None, None) => (0..n).collect(),
        (h, t) => {
            let (h, t) = (h.unwrap_or(0).min(n), t.unwrap_or(0).min(n));
            let mut v: Vec<usize> = (0..h).collect();
            v.extend((n - t).max(h)..n);
            v
        }
    };
    println!("operators:");
    let mut prev = None;
    for i in shown {
        if let Some(p) = prev {
            if i != p + 1 {
                println!("  ... ({} operators omitted)", i - p - 1);
            }
        }
        let line = g.describe_operator(&g.operators[i]);
        println!("{}", if short { shorten(&line) } else { line });
        prev = Some(i);
    }
    if args.iter().any(|a| a == "--tensors") {
        println!("tensors:");
        for t in &g.tensors {
            println!(
                "  t{:<4} {:<60} {:?} {} buffer={} q={:?}",
                t.index,
                t.name,
                t.shape,
                t.dtype,
                t.buffer,
                t.quantization
                    .as_ref()
                    .map(|q| (&q.scale, &q.zero_point, q.quantized_dimension))
            );
        }
    }
    ExitCode::SUCCESS
}

/// Keeps only the part before the first `;` of every quoted name.
fn shorten(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let (mut quoted, mut skipping) = (false, false);
    for c in line.chars() {
        if c == '\'' {
            quoted = !quoted;
            skipping = false;
        } else if quoted && c == ';' {
            skipping = true;
        }
        if !skipping {
            out.push(c);
        }
    }
    out
}
