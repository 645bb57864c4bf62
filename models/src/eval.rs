//! Classification figures as scikit-learn's `classification_report` computes them:
//! accuracy, per-class precision, recall, F1 and support, macro and weighted averages,
//! and the confusion matrix. A zero denominator gives 0, as scikit-learn's default.

use serde::Serialize;

/// Precision, recall, F1 and support of one class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassFigures {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// The full report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassificationReport {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub weighted_f1: f64,
    pub per_class: Vec<ClassFigures>,
    /// `confusion_matrix[true][predicted]`, labels in order.
    pub confusion_matrix: Vec<Vec<usize>>,
    pub labels: Vec<String>,
    pub support: usize,
}

/// Computes the report from true and predicted label ids.
pub fn classification_report(truth: &[usize], predicted: &[usize], labels: &[String]) -> ClassificationReport {
    let k = labels.len();
    let mut cm = vec![vec![0usize; k]; k];
    for (&t, &p) in truth.iter().zip(predicted) {
        if t < k && p < k {
            cm[t][p] += 1;
        }
    }
    let n = truth.len().min(predicted.len());
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class: Vec<ClassFigures> = (0..k)
        .map(|c| {
            let tp = cm[c][c];
            let predicted_c: usize = (0..k).map(|t| cm[t][c]).sum();
            let support: usize = cm[c].iter().sum();
            let precision = ratio(tp, predicted_c);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
            ClassFigures { label: labels[c].clone(), precision, recall, f1, support }
        })
        .collect();
    let mean = |f: &dyn Fn(&ClassFigures) -> f64| if k == 0 { 0.0 } else { per_class.iter().map(f).sum::<f64>() / k as f64 };
    let weighted_f1 = per_class.iter().map(|c| c.f1 * c.support as f64).sum::<f64>() / (n.max(1) as f64);
    ClassificationReport {
        accuracy: ratio((0..k).map(|c| cm[c][c]).sum(), n),
        macro_f1: mean(&|c| c.f1),
        macro_precision: mean(&|c| c.precision),
        macro_recall: mean(&|c| c.recall),
        weighted_f1,
        per_class,
        confusion_matrix: cm,
        labels: labels.to_vec(),
        support: n,
    }
}

impl std::fmt::Display for ClassificationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.labels.iter().map(String::len).max().unwrap_or(8).max(12);
        writeln!(f, "{:>w$} {:>9} {:>9} {:>9} {:>9}", "", "precision", "recall", "f1-score", "support")?;
        writeln!(f)?;
        for c in &self.per_class {
            writeln!(f, "{:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}", c.label, c.precision, c.recall, c.f1, c.support)?;
        }
        writeln!(f)?;
        writeln!(f, "{:>w$} {:>9} {:>9} {:>9.4} {:>9}", "accuracy", "", "", self.accuracy, self.support)?;
        writeln!(
            f,
            "{:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}",
            "macro avg", self.macro_precision, self.macro_recall, self.macro_f1, self.support
        )?;
        writeln!(f, "{:>w$} {:>9} {:>9} {:>9.4} {:>9}", "weighted f1", "", "", self.weighted_f1, self.support)?;
        writeln!(f)?;
        writeln!(f, "confusion matrix (rows: true, columns: predicted)")?;
        write!(f, "{:>w$}", "")?;
        for l in &self.labels {
            write!(f, " {:>8}", l.chars().take(8).collect::<String>())?;
        }
        writeln!(f)?;
        for (l, row) in self.labels.iter().zip(&self.confusion_matrix) {
            write!(f, "{l:>w$}")?;
            for v in row {
                write!(f, " {v:>8}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_scikit_learn_on_a_worked_example() {
        // sklearn.metrics.classification_report([0,0,1,1,2,2,2], [0,1,1,1,2,0,3], labels=[0,1,2,3])
        // gives precision 0.5, 0.6667, 1.0, 0.0; recall 0.5, 1.0, 0.3333, 0.0;
        // f1 0.5, 0.8, 0.5, 0.0; accuracy 0.5714; macro f1 0.45.
        let labels: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| (*s).to_owned()).collect();
        let r = classification_report(&[0, 0, 1, 1, 2, 2, 2], &[0, 1, 1, 1, 2, 0, 3], &labels);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-4;
        assert!(close(r.accuracy, 4.0 / 7.0));
        let p: Vec<f64> = r.per_class.iter().map(|c| c.precision).collect();
        assert!(close(p[0], 0.5) && close(p[1], 2.0 / 3.0) && close(p[2], 1.0) && close(p[3], 0.0));
        let f: Vec<f64> = r.per_class.iter().map(|c| c.f1).collect();
        assert!(close(f[0], 0.5) && close(f[1], 0.8) && close(f[2], 0.5) && close(f[3], 0.0));
        assert!(close(r.macro_f1, 0.45));
        assert_eq!(r.confusion_matrix[2], [1, 0, 1, 1]);
        assert_eq!(r.per_class[3].support, 0);
        assert!(r.to_string().contains("macro avg"));
    }
}
