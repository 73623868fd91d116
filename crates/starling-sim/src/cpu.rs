//! The process's CPU time, for the share of the machine a simulation keeps busy
//! ([`crate::SimReport::cores_busy`]): user plus system time of every thread the process ran,
//! those that have ended included.
//!
//! Read from `/proc/self/stat` (Linux; no `unsafe` for `getrusage`): its `utime` and `stime`
//! are in `USER_HZ` ticks, which Linux fixes at 100 per second for everything it reports to
//! user space, so the figure has a resolution of 10 ms, fine against runs of seconds.
//! Elsewhere there is no figure (`None`).

/// Ticks per second of the times in `/proc/<pid>/stat` (Linux's `USER_HZ`).
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds this process has used so far, if the platform says.
pub fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&stat)
}

/// `utime + stime` in seconds from the text of `/proc/<pid>/stat`: fields 14 and 15, counted
/// after the command name in parentheses (which may itself hold spaces and parentheses).
fn parse_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (the state): utime is field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utime_and_stime_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis; utime 1234, stime 66.
        let stat = "4242 (my (sim) x) R 1 4242 4242 0 -1 4194304 100 0 0 0 1234 66 0 0 20 0 \
                    3 0 555 1000000 200 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(13.0));
        assert_eq!(parse_stat("4242 (truncated) R 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu_time() {
        if cfg!(target_os = "linux") {
            // Burn a little CPU so that at least one tick has passed.
            let mut x = 0u64;
            let start = std::time::Instant::now();
            while start.elapsed().as_millis() < 30 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
            assert!(process_cpu_secs().is_some_and(|s| s > 0.0));
        }
    }
}
