"""Measuring harnesses behind ``deepimage bench``: scaling, hybrid and augmentation throughput.

They measure the library's own code paths with shared process helpers (:mod:`.spawn`) and
one report writer (:mod:`.report`); the analytic scaling model they check stays in
:mod:`deepimage.parallel.perf_model`. Comparisons that need peers not installed with the
package live in the source tree's ``benchmarks/``.
"""
