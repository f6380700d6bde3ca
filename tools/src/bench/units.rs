//! Sizes (`256M`, `1G`, `4096`), rates (`10gbit`, `500mbit`) and durations (`2s`,
//! `500ms`) as the command line spells them.

use std::time::Duration;

/// Parses a byte size: a number with an optional binary suffix `K`, `M`, `G`, `T`
/// (also `KiB`, `MB`, ...; all mean powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 256M, 1G)"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown size suffix {suffix:?} (K, M, G, T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a `tc` rate such as `10gbit`, `500mbit`, `1gbps` and returns it as `tc`
/// will take it (validated, lower case), plus bits per second.
pub fn parse_rate(s: &str) -> Result<(String, u64), String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 10gbit, 500mbit)"))?;
    let bits = match unit {
        "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        "bps" => 8,
        "kbps" => 8_000,
        "mbps" => 8_000_000,
        "gbps" => 8_000_000_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown rate unit {unit:?} (bit, kbit, mbit, gbit, bps, kbps, mbps, gbps)"
            ))
        }
    };
    if n == 0 {
        return Err(format!("{s:?}: a rate must be above zero"));
    }
    let bps = n
        .checked_mul(bits)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    Ok((t, bps))
}

/// Parses a duration: `2s`, `500ms`, `1.5s`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 2s, 500ms)"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// A fraction from 0 to 1.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number from 0 to 1"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?} is not between 0 and 1"))
    }
}

/// vCPU threads of a workload: 1 to [`MAX_THREADS`](super::workload::MAX_THREADS).
pub fn parse_vcpus(s: &str) -> Result<usize, String> {
    parse_count(s, 1)
}

/// vCPU threads of a workload, or 0 for none.
pub fn parse_vcpus_or_none(s: &str) -> Result<usize, String> {
    parse_count(s, 0)
}

fn parse_count(s: &str, min: usize) -> Result<usize, String> {
    let max = super::workload::MAX_THREADS;
    match s.trim().parse::<i64>() {
        Ok(v) if usize::try_from(v).is_ok_and(|v| (min..=max).contains(&v)) => {
            usize::try_from(v).map_err(|e| e.to_string())
        }
        _ => Err(format!("{s:?}: give a whole number from {min} to {max}")),
    }
}

/// Bytes as `1.00 GiB`, `256 MiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = to_f64(b);
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// `u64` as `f64` for figures in reports (exact below 2^53).
pub fn to_f64(v: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // report figures; exact below 2^53
    let f = v as f64;
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn rates_and_durations() {
        assert_eq!(parse_rate("10gbit").map(|r| r.1), Ok(10_000_000_000));
        assert!(parse_rate("10 gbit").is_err());
        assert!(parse_rate("0mbit").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_fraction("1.5").is_err());
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(parse_vcpus("2"), Ok(2));
        assert!(parse_vcpus("0").is_err());
        assert!(parse_vcpus("-1").is_err());
        assert_eq!(parse_vcpus_or_none("0"), Ok(0));
        assert!(parse_vcpus_or_none("65").is_err());
    }
}
