//! The conformance suite every store runs: the same functions, called from
//! each backend's tests. TODO(helper): fill in.
