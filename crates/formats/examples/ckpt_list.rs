//! Lists a TensorFlow checkpoint's variables (name, shape, dtype) like `tf.train.list_variables`,
//! and verifies every tensor's checksum.
//!
//! `cargo run -p deeplab-formats --example ckpt_list -- PREFIX|INDEX|DIR|TARBALL`

use std::process::ExitCode;

use deeplab_formats::Checkpoint;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: ckpt_list PREFIX|model.ckpt.index|DIR|model.tar.gz");
        return ExitCode::from(2);
    };
    let run = || -> Result<(), deeplab_formats::CheckpointError> {
        let ckpt = Checkpoint::open(&path)?;
        for (name, info) in ckpt.iter() {
            println!("{name}\t{:?}\t{}", info.shape, info.dtype);
        }
        let bytes = ckpt.verify_all()?;
        eprintln!(
            "{} variables, {bytes} bytes, all checksums verified",
            ckpt.len()
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
