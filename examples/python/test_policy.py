"""Unit tests of the router's logic, run natively: `python3 -m unittest`
in this directory (no WebAssembly needed)."""

import unittest

import policy


def ask(text, *, history=(), tools=False, json_mode=False):
    msgs = [("system", "You are the help desk.")] + list(history) + [("user", text)]
    return policy.Request(messages=msgs, has_tools=tools, json_mode=json_mode)


class ClassifyTest(unittest.TestCase):
    def tier(self, req, settings=None):
        return policy.classify(req, settings or policy.Settings())[0]

    def test_plain_questions_go_to_the_small_tier(self):
        self.assertEqual(self.tier(ask("how do I reset my password")), 1)
        self.assertEqual(self.tier(ask("Extract the total as JSON: total 12 EUR", json_mode=True)), 1)

    def test_structure_and_size_need_the_mid_tier(self):
        self.assertEqual(self.tier(ask("next?", tools=True)), 2)
        self.assertEqual(self.tier(ask("Summarize:\n" + "word " * 2000)), 2)
        turns = [("user", "q"), ("assistant", "a")] * 4
        self.assertEqual(self.tier(ask("and then?", history=turns)), 2)
        self.assertEqual(self.tier(ask("The job crashed with exit code 1")), 2)

    def test_reasoning_and_calculation_need_the_premium_tier(self):
        self.assertEqual(self.tier(ask("Compare both plans and recommend one; explain why.")), 3)
        self.assertEqual(self.tier(ask("Calculate the cost of 12 seats at 49 for 3 years")), 3)
        self.assertEqual(self.tier(ask("Why is the sky blue?")), 2)

    def test_a_brief_answer_lowers_the_tier(self):
        self.assertEqual(self.tier(ask("Explain in one sentence what an invoice is")), 1)

    def test_cues_inside_a_pasted_document_are_not_read(self):
        doc = "word " * 400 + "compare recommend explain why analyze " + "word " * 400
        self.assertEqual(self.tier(ask("Please answer: is this fine?\n" + doc)), 1)

    def test_settings_are_checked(self):
        with self.assertRaisesRegex(ValueError, "unknown config keys: colour"):
            policy.Settings.from_json({"colour": "red"})
        with self.assertRaisesRegex(ValueError, "premium_cues"):
            policy.Settings.from_json({"premium_cues": 0})
        s = policy.Settings.from_json({"extra_reasoning": ["Forecast"]})
        self.assertEqual(self.tier(ask("forecast next quarter and justify it"), s), 3)

    def test_ladder_takes_the_cheapest_model_per_tier(self):
        c = [("mini", 1, 0.15, 0.6), ("nano", 1, 0.1, 0.4), ("mid", 2, 0.4, 1.6), ("big", 3, 2.5, 10)]
        self.assertEqual(policy.ladder(1, c), ["nano", "mid"])
        self.assertEqual(policy.ladder(3, c), ["big"])
        self.assertEqual(policy.ladder(2, c, top=2), ["mid"])


if __name__ == "__main__":
    unittest.main()
