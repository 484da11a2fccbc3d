-- Keep room on each `jobs` page for both updates of a job's life (claim, then outcome) without
-- pruning, so they stay HOT (no index entries written). Measured with batched claims (issue #8):
-- at fillfactor 70 a page of ~11 fresh rows has room for ~5 new versions, and a claim
-- statement that updates all of them in one transaction cannot prune in between, so about
-- half of the updates were not HOT and wrote all three indexes. At 30 a page holds ~5 rows and
-- room for ~11 versions: two updates per row fit. The price is about twice the heap pages for
-- `jobs`; finished jobs are archived (DESIGN §11). Applies to pages filled from now on.
ALTER TABLE jobs SET (fillfactor = 30);
