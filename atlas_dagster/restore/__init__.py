"""Restore (DESIGN §9): a plan that only reads the target tenant, then the execution of that
exact plan, once.

``rules.py`` decides (pure: what an object's restorable content is, how items match target
objects, which references map where, which writes an item takes); ``store.py`` keeps plans and
items; ``plan.py`` reads the tenant and makes a plan, ``execute.py`` executes one, both through
the one GraphClient.
"""
