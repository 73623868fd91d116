//! `starling train` against plain float32 gradient descent computed here, independently.

use crate::common::{fails, starling};

/// Mini-batch gradient descent on `y = w x + b` with MSE in float32, batches in file order,
/// one step per batch, loss the batch mean: the original TensorFlow graph's semantics.
fn reference(xs: &[f32], ys: &[f32], epochs: u32, batch: usize, lr: f32) -> (f32, f32, f32) {
    let (mut w, mut b) = (5.0f32, 3.0f32);
    for _ in 0..epochs {
        for (bx, by) in xs.chunks(batch).zip(ys.chunks(batch)) {
            let n = bx.len() as f32;
            let (mut gw, mut gb) = (0.0f32, 0.0f32);
            for (&x, &y) in bx.iter().zip(by) {
                let d = w * x + b - y;
                gw += 2.0 * d * x / n;
                gb += 2.0 * d / n;
            }
            w -= lr * gw;
            b -= lr * gb;
        }
    }
    let loss = xs
        .iter()
        .zip(ys)
        .map(|(x, y)| (w * x + b - y).powi(2))
        .sum::<f32>()
        / xs.len() as f32;
    (w, b, loss)
}

fn close(a: f64, b: f32) -> bool {
    (a - f64::from(b)).abs() <= 1e-5 * f64::from(b.abs()).max(1.0)
}

#[test]
fn linear_json_output_matches_float32_gradient_descent() {
    let dir = tempfile::tempdir().unwrap();
    let xs: Vec<f32> = (0..53).map(|i| (i as f32 * 0.731).sin() * 2.0).collect();
    let ys: Vec<f32> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| 2.0 * x + 1.0 + ((i % 5) as f32 - 2.0) * 0.05)
        .collect();
    let mut csv = String::from("x,y\n");
    for (x, y) in xs.iter().zip(&ys) {
        csv.push_str(&format!("{x},{y}\n"));
    }
    let path = dir.path().join("points.csv");
    std::fs::write(&path, csv).unwrap();
    // Values written as text parse back to the same f32s the reference uses.
    let xs: Vec<f32> = xs.iter().map(|x| x.to_string().parse().unwrap()).collect();
    let ys: Vec<f32> = ys.iter().map(|y| y.to_string().parse().unwrap()).collect();

    for (epochs, batch, lr) in [(7, 5, 0.01f32), (3, 53, 0.05), (2, 1, 0.01)] {
        let out = starling()
            .args(["train", "--model", "linear", "--data"])
            .arg(&path)
            .args([
                "--epochs",
                &epochs.to_string(),
                "--batch-size",
                &batch.to_string(),
            ])
            .args(["--lr", &lr.to_string(), "--no-shuffle", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (w, b, loss) = reference(&xs, &ys, epochs, batch, lr);
        let got = |k: &str| {
            v[k].as_f64()
                .unwrap_or_else(|| panic!("`{k}` is not a number: {v}"))
        };
        assert!(
            close(got("W"), w),
            "epochs {epochs} batch {batch}: W {} vs {w}",
            got("W")
        );
        assert!(
            close(got("b"), b),
            "epochs {epochs} batch {batch}: b {} vs {b}",
            got("b")
        );
        assert!(close(got("loss"), loss), "loss {} vs {loss}", got("loss"));
    }
}

#[test]
fn shuffled_training_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.csv");
    let csv: String = (0..40)
        .map(|i| format!("{},{}\n", i as f32 / 20.0, (i * 7 % 11) as f32))
        .collect();
    std::fs::write(&path, csv).unwrap();
    let run = |seed: &str| {
        let out = starling()
            .args(["train", "--data"])
            .arg(&path)
            .args([
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--seed",
                seed,
                "--json",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(run("3"), run("4"));
}

#[test]
fn unusable_data_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.csv");
    let err = fails(starling().args(["train", "--data"]).arg(&missing));
    assert!(
        err.contains("nowhere.csv") && err.contains("cannot read"),
        "{err}"
    );

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "x,y\n1,2\n3,four\n").unwrap();
    let err = fails(starling().args(["train", "--data"]).arg(&bad));
    assert!(
        err.contains("line 3") && err.contains("`four` is not a number"),
        "{err}"
    );

    fails(
        starling()
            .args(["train", "--model", "resnet", "--data"])
            .arg(&bad),
    );
}
