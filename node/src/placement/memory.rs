//! Memory budgets: sizes as people write them (`2G`, `512M`), and the default budget, a
//! safe share of the memory free when the server starts (the GPU's, for a GPU server).

/// Share of the memory available at start that a server takes by default.
pub const DEFAULT_SHARE: f64 = 0.5;

/// Budget when the free memory cannot be read (no `/proc/meminfo`).
pub const FALLBACK_BUDGET: u64 = 1 << 30;

/// Why a size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{text}` is not a size (expected a number with an optional K, M, G or T suffix, like 2G or 512M)"
)]
pub struct SizeError {
    /// What was given.
    pub text: String,
}

/// Parses a size in bytes: a number (decimals allowed) with an optional binary suffix,
/// `K`, `M`, `G` or `T` (also `KB`, `MiB`, `GiB`...; all powers of 1024), or `B`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = || SizeError {
        text: text.to_string(),
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| err())?;
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(err()),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// A size for people: `1.5 GiB`, `512 MiB`, `20 KiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v >= 100.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Bytes of memory available now (`MemAvailable` of `/proc/meminfo`), if readable.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_available(&text)
}

fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Where a server's memory budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `--max-memory`.
    Given,
    /// [`DEFAULT_SHARE`] of the host memory available at start.
    Host,
    /// [`DEFAULT_SHARE`] of the GPU memory free at start.
    Gpu,
    /// [`FALLBACK_BUDGET`]: the free memory could not be read.
    Fallback,
}

impl BudgetSource {
    /// What a server prints after its budget.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Given => "--max-memory",
            Self::Host => "half the memory available",
            Self::Gpu => "half the GPU memory free",
            Self::Fallback => "free memory unreadable",
        }
    }
}

/// The default budget for weights held on `device`: [`DEFAULT_SHARE`] of the GPU's free
/// memory where the device says it (the host's RAM says nothing of a GPU's), else of
/// the host memory available at start, else [`FALLBACK_BUDGET`].
pub fn default_budget(device: &candle_core::Device) -> (u64, BudgetSource) {
    share_of(
        pollen_shard::device::memory_info(device).map(|(free, _)| free),
        available_memory,
    )
}

fn share_of(gpu_free: Option<u64>, host: impl FnOnce() -> Option<u64>) -> (u64, BudgetSource) {
    let share = |b: u64| Some((b as f64 * DEFAULT_SHARE) as u64).filter(|b| *b > 0);
    if let Some(b) = gpu_free.and_then(share) {
        return (b, BudgetSource::Gpu);
    }
    match host().and_then(share) {
        Some(b) => (b, BudgetSource::Host),
        None => (FALLBACK_BUDGET, BudgetSource::Fallback),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512mb"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size(" 1000 "), Ok(1000));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "G", "2X", "-1G", "0", "1e3", "2 G B", "nan"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_print_for_people() {
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }

    #[test]
    fn meminfo_gives_available_bytes() {
        let text = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(meminfo_available(text), Some(8_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn a_gpu_budget_comes_from_the_gpu_not_the_host() {
        let host = || Some(64 << 30);
        assert_eq!(share_of(Some(8 << 30), host), (4 << 30, BudgetSource::Gpu));
        assert_eq!(share_of(None, host), (32 << 30, BudgetSource::Host));
        assert_eq!(share_of(Some(0), host), (32 << 30, BudgetSource::Host));
        assert_eq!(
            share_of(None, || None),
            (FALLBACK_BUDGET, BudgetSource::Fallback)
        );
        // On the CPU the device says nothing: the host's memory decides.
        let (_, source) = default_budget(&candle_core::Device::Cpu);
        assert_ne!(source, BudgetSource::Gpu);
    }
}
