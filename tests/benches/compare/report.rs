//! Figures, their repetitions, and the one table printed at the end.

use std::time::Duration;

/// What a figure's ratio (p2p-node / baseline) must satisfy.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// No target: the row is for information.
    None,
    /// The ratio must be at least this.
    AtLeast(f64),
    /// The ratio must be at most this.
    AtMost(f64),
}

impl Target {
    fn text(self) -> String {
        match self {
            Target::None => "—".into(),
            Target::AtLeast(x) => format!(">= {x}"),
            Target::AtMost(x) => format!("<= {x}"),
        }
    }

    fn met(self, ratio: f64) -> &'static str {
        match self {
            Target::None => "—",
            Target::AtLeast(x) if ratio >= x => "yes",
            Target::AtMost(x) if ratio <= x => "yes",
            _ => "NO",
        }
    }
}

/// One row of the table: a figure measured for p2p-node and its baseline, once per run.
#[derive(Debug)]
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub target: Target,
    /// (p2p-node, baseline) per run; a baseline of `None` was not measured that run.
    pub runs: Vec<(f64, Option<f64>)>,
    /// Why there is no baseline (e.g. a tool is not installed).
    pub missing: Option<String>,
}

impl Row {
    pub fn new(name: impl Into<String>, unit: &'static str, target: Target) -> Self {
        Self {
            name: name.into(),
            unit,
            target,
            runs: Vec::new(),
            missing: None,
        }
    }

    pub fn push(&mut self, p2p: f64, baseline: Option<f64>) {
        self.runs.push((p2p, baseline));
    }

    fn ratios(&self) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|&(p, b)| b.filter(|b| *b > 0.0).map(|b| p / b))
            .collect()
    }
}

/// The median of `xs` (the mean of the middle two for an even count); 0 when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p` quantile (0..=1) of sorted durations, nearest rank.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100_000.0 {
        // Thin grouping for big counts.
        let s = format!("{x:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        out
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn ratio_text(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.1}")
    } else if r >= 0.1 {
        format!("{r:.2}")
    } else {
        format!("{r:.3}")
    }
}

/// Prints the table (Markdown) to stdout.
pub fn print_table(rows: &[Row], runs: usize) {
    println!();
    println!(
        "Medians of {runs} run(s); ratio = p2p-node / baseline, computed per run from figures \
         measured in that run, median [min–max] over runs."
    );
    println!();
    println!("| figure | p2p-node | baseline | ratio | target | met? |");
    println!("|---|---:|---:|---:|---:|:---:|");
    for row in rows {
        let p2p: Vec<f64> = row.runs.iter().map(|r| r.0).collect();
        let base: Vec<f64> = row.runs.iter().filter_map(|r| r.1).collect();
        let ratios = row.ratios();
        let p2p_text = if p2p.is_empty() {
            "—".to_string()
        } else {
            format!("{} {}", num(median(&p2p)), row.unit)
        };
        let (base_text, ratio, met) = if ratios.is_empty() {
            let why = row.missing.clone().unwrap_or_else(|| "—".into());
            (why, "—".to_string(), "—")
        } else {
            let r = median(&ratios);
            let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let text = if ratios.len() > 1 {
                format!("{} [{}–{}]", ratio_text(r), ratio_text(lo), ratio_text(hi))
            } else {
                ratio_text(r)
            };
            (
                format!("{} {}", num(median(&base)), row.unit),
                text,
                row.target.met(r),
            )
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            row.name,
            p2p_text,
            base_text,
            ratio,
            row.target.text(),
            met
        );
    }
}
