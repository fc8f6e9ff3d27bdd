"""Training: run config, data, augmentation, losses, teachers, students, the loop, evaluation.

``deit.train.loop.train(cfg)`` trains; ``deit.train.evaluate.evaluate(model, data)`` scores.
"""
