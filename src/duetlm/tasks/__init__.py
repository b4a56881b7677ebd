"""Named tasks: each a loader of (id, question, gold) examples plus a grader."""
