//! `starling demo` converges on the original demo's model.

#[test]
fn demo_converges_to_the_true_line() {
    let out = crate::common::starling().args(["demo"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    assert!(last.contains("converged"), "{stdout}");
    let num = |key: &str| -> f32 {
        let rest = &last[last.find(key).unwrap() + key.len()..];
        rest.split(|c: char| c == ',' || c.is_whitespace())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!((num("W = ") - 2.0).abs() < 0.05, "{last}");
    assert!((num("b = ") - 1.0).abs() < 0.05, "{last}");
    assert!(stdout.contains("server: http://127.0.0.1:"), "{stdout}");
    // One table row per round, with 15 participants each.
    assert!(
        stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some("15"))
            .count()
            >= 2,
        "{stdout}"
    );
}
