"""Human feedback: the labeler (the query queue and every write to the preference store),
the query kinds it asks (clip pairs, text rankings), the labeling page and clip rendering,
and `Feedback`, which wires them into a run."""
